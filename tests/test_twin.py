"""A Transformer tagger's batch in two halves side by side (genreclf.twin) trains as the whole batch."""

from __future__ import annotations

import threading

import pytest
import torch

from genreclf import twin
from genreclf.lightning_modules import TaggerModule, cpu_fit
from genreclf.models import TransformerConfig
from genreclf.twin import pair, side_by_side


def _batch(n: int = 6, frames: int = 24) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(n, frames, 128, generator=g), "y": (torch.rand(n, 9, generator=g) < 0.3).float()}


def _grads(module: TaggerModule, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in module.named_parameters()}


def _module(dropout: float) -> TaggerModule:
    torch.manual_seed(0)
    cfg = TransformerConfig(n_genres=9, n_layers=2, dropout=dropout, pool_dropout=dropout)
    return TaggerModule(cfg).train()


@pytest.mark.parametrize("n", [6, 5])  # halves of 3 and 3, of 2 and 3
def test_halves_give_the_loss_and_gradients_of_the_whole_batch(two_torch_threads, n):
    module, batch = _module(dropout=0.0), _batch(n)
    whole = module._loss(batch)
    want = _grads(module, whole)
    seen = set()
    module.model.register_forward_hook(lambda *_: seen.add(threading.get_ident()))
    with cpu_fit(module):
        halves = module.batch_loss(batch)
        got = _grads(module, halves)
    assert len(seen) == 2  # each half on a thread of its own
    torch.testing.assert_close(halves, whole, rtol=1e-6, atol=1e-5)
    for name in want:  # float32 sums in another order: within 1e-5 of each gradient's largest element
        scale = max(1.0, want[name].abs().max().item())
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5 * scale, msg=name)


def test_halves_with_dropout_are_reproducible_and_drop_differently_per_half(two_torch_threads):
    module, batch = _module(dropout=0.3), _batch()
    runs = []
    for _ in range(2):
        torch.manual_seed(7)  # as EpochLog seeds each epoch
        with cpu_fit(module):
            loss = module.batch_loss(batch)
            runs.append((loss.detach(), _grads(module, loss)))
    (l1, g1), (l2, g2) = runs
    assert torch.equal(l1, l2) and all(torch.equal(g1[k], g2[k]) for k in g1)
    twice = {"x": torch.cat([batch["x"][:3]] * 2), "y": torch.cat([batch["y"][:3]] * 2)}  # two equal halves
    with cpu_fit(module), torch.no_grad():
        dropped = _half_losses(module, twice)
        module.eval()
        kept = _half_losses(module, twice)
    assert dropped[0] != dropped[1]  # each half draws masks of its own ...
    torch.testing.assert_close(kept[0], kept[1], rtol=1e-6, atol=1e-6)  # ... and without dropout they agree


def _half_losses(module: TaggerModule, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The two halves' losses, each on a thread of its own with a generator of its own, as batch_loss has them."""
    seeds = torch.randint(0, 2**62, (2,)).tolist()

    def half(part, seed):
        with twin.generator(seed):
            return module._loss(part)

    n = len(batch["x"]) // 2
    parts = [{k: v[:n] for k, v in batch.items()}, {k: v[n:] for k, v in batch.items()}]
    return pair(half, (parts[0], seeds[0]), (parts[1], seeds[1]))


def test_an_error_in_the_second_thread_reaches_the_caller_and_the_thread_serves_on(two_torch_threads):
    def fail(which):
        if which == "second":
            raise ValueError("second failed")
        return which

    with side_by_side(), pytest.raises(ValueError, match="second failed"):
        pair(fail, ("first",), ("second",))
    with side_by_side():
        assert pair(fail, ("a",), ("b",)) == ("a", "b")


def test_a_pair_within_a_pair_runs_in_turn(two_torch_threads):
    def inner(_):
        return pair(threading.get_ident, (), ())

    with side_by_side():
        (a, b) = pair(inner, (0,), (1,))
    assert a[0] == a[1] and b[0] == b[1] and a[0] != b[0]  # no third thread, no deadlock
