"""fast_gru computes nn.GRU's function and every gradient nn.GRU's autograd computes, on nn.GRU's parameters."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from genreclf.fastgru import _BiGRULayer, _directions, fast_gru
from genreclf.losses import weighted_bce
from genreclf.models import GRUConfig, GRUTagger, init_keras_style
from genreclf.twin import side_by_side


def _grads(gru: nn.GRU, out: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
    names, params = zip(*gru.named_parameters())
    inputs = (x, *params) if x.requires_grad else params
    grads = torch.autograd.grad((out * weight).sum(), inputs)
    return dict(zip((("x",) if x.requires_grad else ()) + names, grads))


@pytest.mark.parametrize(
    "n_in, hidden, layers, batch, frames",
    [(128, 128, 2, 4, 50), (16, 8, 1, 3, 7), (5, 4, 3, 2, 1)],
)
@pytest.mark.parametrize("input_grad", [False, True])
def test_outputs_and_every_gradient_equal_nn_gru(n_in, hidden, layers, batch, frames, input_grad):
    torch.manual_seed(0)
    gru = nn.GRU(n_in, hidden, num_layers=layers, batch_first=True, bidirectional=True)
    init_keras_style(gru)  # the models' init: the recurrence neither explodes nor vanishes
    for name, p in gru.named_parameters():
        if name.startswith("bias"):  # non-zero, so that every gate term is exercised
            nn.init.uniform_(p, -0.5, 0.5)
    x = torch.randn(batch, frames, n_in, requires_grad=input_grad)
    weight = torch.randn(batch, frames, 2 * hidden)
    ref = gru(x)[0]
    ours = fast_gru(gru, x)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    want, got = _grads(gru, ref, weight, x), _grads(gru, ours, weight, x)
    assert list(got) == list(want)
    for name in want:
        scale = max(1.0, want[name].abs().max().item())
        torch.testing.assert_close(got[name], want[name], atol=1e-5 * scale, rtol=0, msg=name)


def test_gradcheck_in_float64():
    torch.manual_seed(0)
    n_in, hidden = 3, 2
    x = torch.randn(4, 2, n_in, dtype=torch.float64, requires_grad=True)  # time-major (frames, batch, n_in)
    shapes = [(3 * hidden, n_in), (3 * hidden, hidden), (3 * hidden,), (3 * hidden,)] * 2
    weights = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    assert torch.autograd.gradcheck(_BiGRULayer.apply, (x, *weights))


def test_tagger_training_gradients_equal_those_through_nn_gru():
    torch.manual_seed(0)
    model = GRUTagger(GRUConfig(n_genres=7, hidden=16, pool_dropout=0.0))
    x, y = torch.randn(3, 20, 128), (torch.rand(3, 7) < 0.3).float()
    params = dict(model.named_parameters())
    ours = torch.autograd.grad(weighted_bce(model(x), y, 4.0), list(params.values()))
    logits = model.head(model.gru(x)[0].mean(1))  # the model's function, all through nn.GRU
    ref = torch.autograd.grad(weighted_bce(logits, y, 4.0), list(params.values()))
    for name, got, want in zip(params, ours, ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=name)


def test_dropout_between_layers_in_training_only():
    torch.manual_seed(0)
    gru = nn.GRU(8, 4, num_layers=2, batch_first=True, bidirectional=True, dropout=0.5)
    x = torch.randn(2, 6, 8)
    train_out = fast_gru(gru, x)
    gru.eval()
    torch.testing.assert_close(fast_gru(gru, x), gru(x)[0], atol=1e-6, rtol=0)
    assert not torch.allclose(train_out, gru(x)[0])


def test_refuses_a_gru_it_does_not_implement():
    with pytest.raises(ValueError, match="bidirectional"):
        fast_gru(nn.GRU(4, 4, batch_first=True), torch.randn(1, 3, 4))


def test_side_by_side_runs_the_directions_on_two_threads_with_nn_grus_function(two_torch_threads):
    torch.manual_seed(0)
    gru = nn.GRU(16, 8, num_layers=2, batch_first=True, bidirectional=True)
    x = torch.randn(3, 12, 16, requires_grad=True)
    weight = torch.randn(3, 12, 16)
    ref = gru(x)[0]
    want = _grads(gru, ref, weight, x)
    with side_by_side() as paired:
        assert paired and torch.get_num_threads() == 1  # one intra-op thread here, one in the other thread
        threads = _directions(lambda: threading.get_ident(), (), ())
        ours = fast_gru(gru, x)
        got = _grads(gru, ours, weight, x)
    assert torch.get_num_threads() == 2  # given back
    assert threads[0] == threading.get_ident() != threads[1]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=0, msg=name)


def test_side_by_side_is_a_no_op_with_one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with side_by_side() as paired:
            assert not paired
            assert _directions(lambda: threading.get_ident(), (), ()) == (threading.get_ident(),) * 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads, halves", [(2, (1, 1)), (3, (1, 2)), (4, (2, 2))])
def test_the_directions_share_the_process_threads(threads, halves):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with side_by_side():
            assert torch.get_num_threads() == halves[0]
            assert _directions(torch.get_num_threads, (), ()) == halves
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_within_side_by_side_the_tagger_scores_without_gradients_through_fast_gru(two_torch_threads):
    torch.manual_seed(0)
    model = GRUTagger(GRUConfig(n_genres=7, hidden=16)).eval()
    x = torch.randn(3, 20, 128)
    with torch.no_grad():
        want = model.head(model.gru(x)[0].mean(1))  # nn.GRU
        calls = []
        model.gru.register_forward_hook(lambda *_: calls.append("nn.GRU"))
        with side_by_side(), torch.inference_mode():  # as Lightning validates within a fit
            got = model(x)
        assert calls == []  # our layers ran, not nn.GRU's
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert model(x) is not None and calls == ["nn.GRU"]  # outside a fit: nn.GRU, faster with 2 threads
