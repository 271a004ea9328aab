"""fastops: the oneDNN linear and the cheap dropout compute what F.linear and F.dropout compute."""

from __future__ import annotations

import resource
import sys

import pytest
import torch
import torch.nn.functional as F

from genreclf.fastops import (
    Dropout,
    Linear,
    dropout,
    dropout_mask,
    keep_freed_memory,
    keep_threshold,
    linear,
    linear_relu,
    onednn_mm_t,
    use_onednn,
)

needs_onednn = pytest.mark.skipif(not use_onednn(torch.zeros(1)), reason="this PyTorch has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("shape, n_in, n_out", [((4, 37, 24), 24, 40), ((300, 64), 64, 8), ((2, 5, 3, 16), 16, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_f_linear_and_its_gradients(shape, n_in, n_out, bias):
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    w = torch.randn(n_out, n_in, requires_grad=True)
    b = torch.randn(n_out, requires_grad=True) if bias else None
    inputs = [x, w] + ([b] if bias else [])
    g = torch.randn(*shape[:-1], n_out)
    ours, ref = linear(x, w, b), F.linear(x, w, b)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(torch.autograd.grad(ours, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@needs_onednn
def test_linear_relu_matches_f_relu_of_f_linear_and_its_gradients():
    torch.manual_seed(0)
    x = torch.randn(4, 37, 24, requires_grad=True)
    w = torch.randn(40, 24, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    g = torch.randn(4, 37, 40)
    ours, ref = linear_relu(x, w, b), F.relu(F.linear(x, w, b))
    assert 0.3 < (ref > 0).float().mean() < 0.7
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(torch.autograd.grad(ours, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@needs_onednn
def test_linear_skips_the_input_gradient_when_the_input_needs_none():
    layer = Linear(8, 3)
    x = torch.randn(5, 8)  # features: no gradient wanted
    layer(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, torch.ones(3, 1) * x.sum(0), atol=1e-5, rtol=1e-5)
    assert x.grad is None


@needs_onednn
@pytest.mark.parametrize("m, k", [(7, 30), (30, 7)])  # either operand is the one copied
def test_onednn_mm_t_on_strided_operands(m, k):
    torch.manual_seed(0)
    a = torch.randn(500, m + 3)[:, :m]  # rows not dense
    b = torch.randn(k, 500).t()  # transposed
    torch.testing.assert_close(onednn_mm_t(a, b), a.t() @ b, atol=1e-4, rtol=1e-5)


def test_linear_module_keeps_nn_linear_parameters():
    torch.manual_seed(0)
    ours = Linear(6, 4)
    ref = torch.nn.Linear(6, 4)
    ref.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == ["weight", "bias"]
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(ours.double()(x), ref.double()(x))  # float64: PyTorch's own path


@pytest.mark.parametrize("p", [0.1, 0.2, 0.3, 0.5, 1e-6, 0.999])
def test_dropout_keeps_with_probability_one_minus_p(p):
    # The mask keeps the int16 values >= the threshold: count them exactly.
    kept = 32768 - keep_threshold(p)
    assert abs(kept / 65536 - (1 - p)) <= 2**-17


@pytest.mark.parametrize("p", [0.2, 0.3])
def test_dropout_mask_rate_is_the_same_in_every_16_bit_slice_of_a_draw(p):
    torch.manual_seed(0)
    n = 4 * 2**20
    keep = dropout_mask(torch.Size([n]), p, torch.device("cpu")).view(-1, 4).float()
    # A slice that held a constant bit (e.g. a sign bit from a non-negative draw) would be off by ~0.2.
    sigma = (p * (1 - p) / 2**20) ** 0.5
    assert (keep.mean(0) - (1 - p)).abs().max() < 5 * sigma


def test_dropout_scales_kept_values_by_one_over_keep_and_backpropagates_the_mask():
    torch.manual_seed(0)
    p = 0.3
    x = torch.randn(8, 50, 16, requires_grad=True)
    y = dropout(x, p, training=True)
    kept = y != 0
    assert 0.6 < kept.float().mean() < 0.8
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), atol=0, rtol=1e-6)
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    torch.testing.assert_close(grad, kept.float() / (1 - p), atol=0, rtol=1e-6)


def test_dropout_follows_the_torch_seed_and_is_identity_in_eval():
    x = torch.randn(4, 10, 8)
    layer = Dropout(0.2)
    torch.manual_seed(3)
    a = layer(x)
    torch.manual_seed(3)
    assert torch.equal(layer(x), a) and not torch.equal(a, x)
    assert layer.eval()(x) is x
    assert dropout(x, 0.0, training=True) is x


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_keep_freed_memory_reuses_freed_activations_without_page_faults():
    def faults_of_steps() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            torch.ones(4 * 2**20)  # 16 MB allocated, written and freed, like a step's activations
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    with keep_freed_memory():
        faults_of_steps()  # the first one takes the pages
        assert faults_of_steps() < 500  # each 16 MB is 4096 pages, were they faulted in again
