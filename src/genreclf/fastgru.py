"""A faster bidirectional GRU for full-length batches (training crops), on nn.GRU's own parameters.

nn.GRU's CPU autograd records every timestep's ops and runs the two directions one after
the other; its backward makes ~1000 tiny matmuls per layer, weight gradients accumulated
step by step. Here one layer is one autograd.Function with a hand-written backward:
  - each direction's input projections of all timesteps are one matmul;
  - each direction's recurrence is a TorchScript loop (no Python per op, and no GIL held, so the
    two directions run side by side on two threads, as Keras runs them: `_directions`);
  - the backward loop does, per step, only the element-wise gate gradients and one matmul for
    dh; the weight and bias gradients are a few big matmuls and sums after the loop.
The equations are PyTorch's (gate order r, z, n):
    r, z = sigmoid(W_ir x + b_ir + W_hr h + b_hr), sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)),  h' = (1 - z) * n + z * h
Padded batches (lengths < frames) still go through nn.GRU with packing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from genreclf import twin
from genreclf.fastops import dropout, onednn_linear, onednn_mm_t, use_onednn


class _BiGRULayer(torch.autograd.Function):
    """One bidirectional GRU layer over a time-major (frames, batch, features) input, zero initial state."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, *weights: Tensor) -> Tensor:
        # weights: (w_ih, w_hh, b_ih, b_hh) of the forward direction, then of the reverse one.
        t, b, _ = x.shape
        hid = weights[1].shape[1]
        # Direction 1 reads time backwards: its step s is frame t - 1 - s. Everything below is step-indexed.
        x2 = torch.stack([x, x.flip(0)]).view(2, t * b, -1)
        rz = x.new_empty(2, t, b, 2 * hid)  # sigmoid(r, z) of every step
        y = x.new_empty(2, t, b, hid)
        # dL/d(pre-activation) = dh * k per gate; k is made in the loop, per step, while its inputs are in
        # cache (as whole-sequence tensors the same arithmetic costs ~4x more: memory-bound). Gates in k:
        # r, z, the hidden n part (W_hn h + b_hn), the input n part.
        train = any(ctx.needs_input_grad)
        k = x.new_empty(2, t if train else 0, b, 4, hid)
        _directions(_forward, *((x2[i], *weights[4 * i : 4 * i + 4], y[i], rz[i], k[i], train) for i in range(2)))
        ctx.save_for_backward(x2, *weights, rz, y, k)
        return torch.cat([y[0], y[1].flip(0)], dim=-1)

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        x2, *weights, rz, y, k = ctx.saved_tensors
        _, t, b, hid = y.shape
        dy = torch.stack([dout[..., :hid], dout[..., hid:].flip(0)])  # (2, t, b, hid), step-indexed
        z, need_dx = rz[..., hid:], ctx.needs_input_grad[0]
        w_ih, w_hh = weights[0::4], weights[1::4]
        grads = _directions(_backward, *((dy[i], z[i], k[i], x2[i], y[i], w_ih[i], w_hh[i], need_dx) for i in range(2)))
        dx = (grads[0][0].view(t, b, -1) + grads[1][0].view(t, b, -1).flip(0)) if need_dx else None
        return dx, *grads[0][1:], *grads[1][1:]


def _forward(
    x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor, y: Tensor, rz: Tensor, k: Tensor, train: bool
) -> None:
    """One direction's forward on its step-indexed (t * b, features) input x: fill y, rz and (train) k."""
    hid = w_hh.shape[1]
    # tanh(a) = 2 sigmoid(2a) - 1, and on these small tensors sigmoid_ + addcmul cost a third of
    # tanh_ (measured): the n rows of the input gates are doubled (exactly).
    double_n = torch.ones(3 * hid, 1, dtype=x.dtype, device=x.device)
    double_n[2 * hid :] = 2.0
    gi = _input_gates(x, w_ih * double_n, b_ih * double_n.squeeze(1)).view(*y.shape[:2], 3 * hid)
    _forward_steps(gi, w_hh.t().contiguous(), b_hh, y, rz, k, train)


def _backward(
    dy: Tensor, z: Tensor, k: Tensor, x: Tensor, y: Tensor, w_ih: Tensor, w_hh: Tensor, need_dx: bool
) -> tuple[Tensor | None, ...]:
    """One direction's backward: its dx (t * b, features) and the gradients of w_ih, w_hh, b_ih, b_hh."""
    t, b, hid = y.shape
    d = y.new_empty(t, b, 4, hid)
    _backward_steps(dy, z, k, w_hh, d)
    return _weight_grads(d.view(t * b, 4 * hid), x, y, w_ih, need_dx)


def _forward_steps(gi: Tensor, w_hh_t: Tensor, b_hh: Tensor, y: Tensor, rz: Tensor, k: Tensor, train: bool) -> None:
    """One direction's recurrence: fill y (t, b, hid), rz (t, b, 2 hid) and, if train, k (t, b, 4, hid)."""
    t, b, hid = gi.shape[0], gi.shape[1], w_hh_t.shape[0]
    h = torch.zeros(b, hid, dtype=gi.dtype, device=gi.device)
    gh = torch.empty(b, 3 * hid, dtype=gi.dtype, device=gi.device)  # scratch, reused every step
    n, omz = torch.empty_like(h), torch.empty_like(h)
    gh_rz, gh_n = gh[:, : 2 * hid], gh[:, 2 * hid :]
    for s in range(t):
        torch.addmm(b_hh, h, w_hh_t, out=gh)
        gi_s, rz_s, y_s = gi[s], rz[s], y[s]
        torch.add(gi_s[:, : 2 * hid], gh_rz, out=rz_s).sigmoid_()
        r, z = rz_s[:, :hid], rz_s[:, hid:]
        torch.addcmul(gi_s[:, 2 * hid :], r, gh_n, value=2.0, out=n).sigmoid_()
        n.mul_(2.0).sub_(1.0)
        if train:
            k_s = k[s]
            kr, kz, khn, kin = k_s[:, 0], k_s[:, 1], k_s[:, 2], k_s[:, 3]
            torch.sub(h, n, out=kz)
            torch.addcmul(n, z, kz, out=y_s)  # (1 - z) n + z h
            torch.neg(z, out=omz).add_(1.0)
            torch.mul(n, n, out=kin)
            torch.addcmul(omz, omz, kin, value=-1.0, out=kin)  # (1 - z)(1 - n^2)
            torch.mul(kin, r, out=khn)
            torch.mul(gh_n, kin, out=kr)
            k_s[:, :2].mul_(torch.addcmul(rz_s, rz_s, rz_s, value=-1.0).view(b, 2, hid))  # r(1 - r), z(1 - z)
        else:
            torch.lerp(n, h, z, out=y_s)
        h = y_s


def _backward_steps(dy: Tensor, z: Tensor, k: Tensor, w_hh: Tensor, d: Tensor) -> None:
    """One direction's backward recurrence: fill d (t, b, 4, hid), the gradients of the gates' pre-activations."""
    t, b, hid = dy.shape[0], dy.shape[1], w_hh.shape[1]
    dh, acc = dy[t - 1].clone(), torch.empty_like(dy[0])
    for i in range(t):
        s = t - 1 - i
        d_s = d[s]
        torch.mul(dh.unsqueeze(1), k[s], out=d_s)
        if s > 0:
            torch.addcmul(dy[s - 1], dh, z[s], out=acc)
            torch.addmm(acc, d_s.view(b, 4 * hid)[:, : 3 * hid], w_hh, out=dh)


def _script(fn: Callable) -> Callable:
    """Return `fn` compiled by TorchScript (its loop then runs without the GIL), or `fn` where that fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script: deprecated, not removed
            return torch.jit.script(fn)
    except Exception:  # noqa: BLE001 (a torch without TorchScript: the same function, run by Python)
        return fn


_forward_steps, _backward_steps = _script(_forward_steps), _script(_backward_steps)
_SCRIPTED = isinstance(_forward_steps, torch.jit.ScriptFunction)  # else the loops hold the GIL: no second thread


def _directions(fn: Callable, forward: tuple, reverse: tuple) -> tuple[Any, Any]:
    """Run fn on both directions' arguments: side by side on two threads when torch has two, else in turn.

    Keras runs the two directions of its Bidirectional GRU concurrently too. The directions' loops are
    TorchScript, which holds no GIL, so the two threads run in parallel; without it they run in turn.
    """
    return twin.pair(fn, forward, reverse) if _SCRIPTED else (fn(*forward), fn(*reverse))


def _input_gates(x: Tensor, w_ih: Tensor, b_ih: Tensor) -> Tensor:
    """Return x @ w_ih.T + b_ih: (rows, 3 * hidden)."""
    return onednn_linear(x, w_ih, b_ih) if use_onednn(x, w_ih) else torch.addmm(b_ih, x, w_ih.t())


def _weight_grads(d: Tensor, x: Tensor, y: Tensor, w_ih: Tensor, need_dx: bool) -> tuple[Tensor | None, ...]:
    """Return one direction's dx and the gradients of w_ih, w_hh, b_ih, b_hh from its step gradients d."""
    t, b, hid = y.shape
    dgh = d[:, : 3 * hid]
    dgi = torch.cat([d[:, : 2 * hid], d[:, 3 * hid :]], dim=-1)
    # Step 0 started from the zero state: it adds nothing to dW_hh.
    h_prev = y[:-1].reshape((t - 1) * b, hid)
    if use_onednn(d):
        # On all four gate columns of d, which are dense, the last (input n) dropped after.
        dw_hh = onednn_mm_t(d[b:], h_prev)[: 3 * hid]
        dw_ih = onednn_mm_t(dgi, x)
        dx = onednn_linear(dgi, w_ih.t().contiguous()) if need_dx else None
    else:
        dw_hh, dw_ih = dgh[b:].t() @ h_prev, dgi.t() @ x
        dx = dgi @ w_ih if need_dx else None
    return dx, dw_ih, dw_hh, dgi.sum(0), dgh.sum(0)


def bigru_layer(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor, *reverse: Tensor) -> Tensor:
    """Return the (frames, batch, 2 * hidden) outputs of one bidirectional GRU layer on time-major x."""
    return _BiGRULayer.apply(x, w_ih, w_hh, b_ih, b_hh, *reverse)


def fast_gru(gru: nn.GRU, x: Tensor) -> Tensor:
    """Return nn.GRU's outputs (batch, frames, 2 * hidden) for a full-length batch-first x, zero initial state."""
    if not (gru.bidirectional and gru.batch_first and gru.bias and gru.proj_size == 0):
        raise ValueError("fast_gru needs a batch-first bidirectional nn.GRU with biases and no projection")
    h = x.transpose(0, 1)
    for layer in range(gru.num_layers):
        if layer and gru.dropout and gru.training:
            h = dropout(h, gru.dropout, training=True)
        names = [f"{kind}_l{layer}{suffix}" for suffix in ("", "_reverse") for kind in _WEIGHTS]
        h = bigru_layer(h, *(getattr(gru, name) for name in names))
    return h.transpose(0, 1)


_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
