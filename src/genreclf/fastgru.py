"""A faster bidirectional GRU for full-length batches (training crops), on nn.GRU's own parameters.

nn.GRU's CPU autograd records every timestep's ops and runs the two directions one after
the other; its backward makes ~1000 tiny matmuls per layer, weight gradients accumulated
step by step. Here one layer is one autograd.Function with a hand-written backward:
  - the input projections of all timesteps are one batched matmul, both directions at once;
  - the directions are a batch of 2 (the backward one time-reversed): one baddbmm per step;
  - the backward loop does, per step, only the element-wise gate gradients and one bmm for
    dh; the weight and bias gradients are a few big matmuls and sums after the loop.
The equations are PyTorch's (gate order r, z, n):
    r, z = sigmoid(W_ir x + b_ir + W_hr h + b_hr), sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)),  h' = (1 - z) * n + z * h
Padded batches (lengths < frames) still go through nn.GRU with packing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from genreclf.fastops import dropout, onednn_linear, onednn_mm_t, use_onednn


class _BiGRULayer(torch.autograd.Function):
    """One bidirectional GRU layer over a time-major (frames, batch, features) input, zero initial state."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, *weights: Tensor) -> Tensor:
        # weights: (w_ih, w_hh, b_ih, b_hh) of the forward direction, then of the reverse one.
        w_ih, w_hh, b_ih, b_hh = (torch.stack([weights[i], weights[i + 4]]) for i in range(4))
        t, b, _ = x.shape
        hid = w_hh.shape[2]
        # Direction 1 reads time backwards: its step s is frame t - 1 - s. Everything below is step-indexed.
        x2 = torch.stack([x, x.flip(0)]).view(2, t * b, -1)
        # tanh(a) = 2 sigmoid(2a) - 1, and on these small tensors sigmoid_ + addcmul cost a third of
        # tanh_ (measured): the n rows of the input gates are doubled (exactly).
        double_n = torch.ones(3 * hid, 1, dtype=x.dtype, device=x.device)
        double_n[2 * hid :] = 2.0
        gi = _input_gates(x2, w_ih * double_n, b_ih * double_n.squeeze(1)).view(2, t, b, 3 * hid)
        w_hh_t, b_hh1 = w_hh.transpose(1, 2), b_hh.unsqueeze(1)
        gh, n = x.new_empty(2, b, 3 * hid), x.new_empty(2, b, hid)  # scratch, reused every step
        gh_rz, gh_n = gh[..., : 2 * hid], gh[..., 2 * hid :]
        rz = x.new_empty(t, 2, b, 2 * hid)  # sigmoid(r, z) of every step
        y = x.new_empty(2, t, b, hid)
        # dL/d(pre-activation) = dh * k per gate; k is made here, per step, while its inputs are in cache
        # (as whole-sequence tensors the same arithmetic costs ~4x more: memory-bound). Gates in k:
        # r, z, the hidden n part (W_hn h + b_hn), the input n part.
        train = any(ctx.needs_input_grad)
        k = x.new_empty(t, 2, b, 4, hid) if train else x.new_empty(1, 2, b, 4, hid)
        # Per-step views made once: the loop's Python overhead is a fair share of its time.
        steps = zip(
            gi[..., : 2 * hid].unbind(1),
            gi[..., 2 * hid :].unbind(1),
            rz.unbind(0),
            rz[..., :hid].unbind(0),
            rz[..., hid:].unbind(0),
            y.unbind(1),
            k.expand(t, -1, -1, -1, -1).unbind(0),
        )
        h = x.new_zeros(2, b, hid)
        # Full-size constants: a Python number costs a tensor conversion per op, a 0-dim one a broadcast.
        ones, minus_ones, twos = x.new_ones(2, b, hid), x.new_full((2, b, hid), -1.0), x.new_full((2, b, hid), 2.0)
        for gi_rz, gi_n, rz_s, r_s, z_s, y_s, k_s in steps:
            torch.baddbmm(b_hh1, h, w_hh_t, out=gh)
            torch.add(gi_rz, gh_rz, out=rz_s).sigmoid_()
            torch.addcmul(minus_ones, torch.addcmul(gi_n, r_s, gh_n, value=2, out=n).sigmoid_(), twos, out=n)
            if not train:
                h = torch.lerp(n, h, z_s, out=y_s)
                continue
            kr, kz, khn, kin = k_s.unbind(2)
            torch.sub(h, n, out=kz)
            h = torch.addcmul(n, z_s, kz, out=y_s)  # (1 - z) n + z h
            omz = torch.sub(ones, z_s)
            torch.addcmul(omz, omz, torch.mul(n, n, out=kin), value=-1, out=kin)  # (1 - z)(1 - n^2)
            torch.mul(kin, r_s, out=khn)
            torch.mul(gh_n, kin, out=kr)
            k_s[:, :, :2].mul_(torch.addcmul(rz_s, rz_s, rz_s, value=-1).view(2, b, 2, hid))  # r(1 - r), z(1 - z)
        ctx.save_for_backward(x2, w_ih, w_hh, rz, y, k)
        return torch.cat([y[0], y[1].flip(0)], dim=-1)

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        x2, w_ih, w_hh, rz, y, k = ctx.saved_tensors
        _, t, b, hid = y.shape
        dy = torch.stack([dout[..., :hid], dout[..., hid:].flip(0)])  # (2, t, b, hid), step-indexed
        d = y.new_empty(2, t, b, 4 * hid)
        dh, acc = dy[:, t - 1].clone(), y.new_empty(2, b, hid)
        dh4 = dh.unsqueeze(2)
        d4, dgh = d.view(2, t, b, 4, hid).unbind(1), d[..., : 3 * hid].unbind(1)
        dys, zs, ks = dy.unbind(1), rz[..., hid:].unbind(0), k.unbind(0)
        for s in range(t - 1, -1, -1):
            torch.mul(dh4, ks[s], out=d4[s])
            if s:
                torch.addcmul(dys[s - 1], dh, zs[s], out=acc)
                torch.baddbmm(acc, dgh[s], w_hh, out=dh)
        grads = _weight_grads(d, x2, y, w_ih, ctx.needs_input_grad[0])
        return grads[0], *(g[0] for g in grads[1:]), *(g[1] for g in grads[1:])


def _input_gates(x2: Tensor, w_ih: Tensor, b_ih: Tensor) -> Tensor:
    """Return x2 @ w_ih.T + b_ih per direction: (2, rows, 3 * hidden)."""
    if use_onednn(x2, w_ih):
        return torch.stack([onednn_linear(x2[i], w_ih[i], b_ih[i]) for i in range(2)])
    return torch.baddbmm(b_ih.unsqueeze(1), x2, w_ih.transpose(1, 2))


def _weight_grads(d: Tensor, x2: Tensor, y: Tensor, w_ih: Tensor, need_dx: bool) -> tuple[Tensor | None, ...]:
    """Return dx and the (2, ...) gradients of w_ih, w_hh, b_ih, b_hh from the step gradients d."""
    _, t, b, hid4 = d.shape
    hid = hid4 // 4
    d = d.view(2, t * b, hid4)
    dgh = d[..., : 3 * hid]
    dgi = torch.cat([d[..., : 2 * hid], d[..., 3 * hid :]], dim=-1)
    # Step 0 started from the zero state: it adds nothing to dW_hh.
    h_prev = y[:, :-1].reshape(2, (t - 1) * b, hid)
    if use_onednn(d):
        # On all four gate columns of d, which are dense, the last (input n) dropped after.
        dw_hh = torch.stack([onednn_mm_t(d[i, b:], h_prev[i])[: 3 * hid] for i in range(2)])
        dw_ih = torch.stack([onednn_mm_t(dgi[i], x2[i]) for i in range(2)])
    else:
        dw_hh = torch.bmm(dgh[:, b:].transpose(1, 2), h_prev)
        dw_ih = torch.bmm(dgi.transpose(1, 2), x2)
    dx = None
    if need_dx:
        if use_onednn(d):
            dx2 = torch.stack([onednn_linear(dgi[i], w_ih[i].t().contiguous()) for i in range(2)])
        else:
            dx2 = torch.bmm(dgi, w_ih)
        dx2 = dx2.view(2, t, b, -1)
        dx = dx2[0] + dx2[1].flip(0)
    return dx, dw_ih, dw_hh, dgi.sum(1), dgh.sum(1)


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
