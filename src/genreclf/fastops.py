"""Faster CPU float32 building blocks for training: oneDNN matmuls, cheap dropout masks, kept memory.

Measured on an AMD EPYC (Zen 5, AVX-512; benchmarks/train.py): PyTorch's float32 matmuls
go to MKL, which runs its AVX2 code on AMD and reaches about half of what oneDNN's AVX-512
kernels do on the same shapes (`linear`, `linear_relu` with the ReLU fused in: forward and
backward by oneDNN); `bernoulli_` (dropout's mask) costs ~7 ms per million elements, where
drawing 64 random bits per 4 elements and comparing 16-bit slices costs ~1 ms (`dropout`).
A training step also allocates and frees ~80 MB of activations; glibc returns them to the OS
and every step pays ~20,000 page faults (~15 ms) to get them back (`keep_freed_memory`).
All compute the same function: oneDNN sums in another order (float32 rounding, ~1e-7 relative),
and the mask keeps each element with probability 1 - p to within 2^-17.
Elsewhere (GPUs, other dtypes, a build without oneDNN) the plain PyTorch ops run.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genreclf import twin

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def use_onednn(*tensors: Tensor) -> bool:
    """Return True when oneDNN should run the matmuls of these tensors (CPU float32)."""
    return _ONEDNN and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Return x @ weight.T + bias by oneDNN, without autograd; weight (out, in) may be a strided view."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def onednn_mm_t(a: Tensor, b: Tensor) -> Tensor:
    """Return a.T @ b for a (n, m) and b (n, k) with large n (a weight gradient), by oneDNN."""
    # oneDNN copies its input to rows and reads the weight as it lies: copy the narrower one.
    if not len(a):  # oneDNN refuses empty operands
        return a.new_zeros(a.shape[1], b.shape[1])
    # The weight must be dense (a transposed view is): oneDNN runs its slow reference kernel otherwise.
    if a.shape[1] <= b.shape[1]:
        return onednn_linear(a.t(), b.contiguous().t())
    return onednn_linear(b.t(), a.contiguous().t()).t()


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        return _linear_backward(ctx, grad, x, weight)


def _linear_backward(ctx: Any, grad: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor | None, ...]:
    g2 = grad.reshape(-1, grad.shape[-1])
    dx = onednn_linear(grad, weight.t().contiguous()) if ctx.needs_input_grad[0] else None
    dw = onednn_mm_t(g2, x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
    db = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dw, db


class _LinearReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu", [], "")  # the ReLU fused in
        ctx.save_for_backward(x, weight, y)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, y = ctx.saved_tensors
        return _linear_backward(ctx, torch.ops.aten.threshold_backward(grad, y, 0), x, weight)


def linear_relu(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Return F.relu(F.linear(x, weight, bias)), by oneDNN in one pass on CPU float32."""
    if use_onednn(x, weight):
        return _LinearReLU.apply(x, weight, bias)
    return F.relu(F.linear(x, weight, bias))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Return F.linear(x, weight, bias), by oneDNN (forward and backward) on CPU float32."""
    if use_onednn(x, weight):
        return _Linear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state_dict keys) whose forward is `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        """Return x @ weight.T + bias."""
        return linear(x, self.weight, self.bias)


def keep_threshold(p: float) -> int:
    """Return the int16 value t such that a uniform int16 is >= t with probability 1 - p (to within 2^-17)."""
    # round(p * 2^16) of the 2^16 values, the lowest ones, are dropped.
    return round(p * 65536) - 32768


def dropout_mask(shape: torch.Size, p: float, device: torch.device) -> Tensor:
    """Return a bool mask of `shape`, each element True (kept) with probability 1 - p (to within 2^-17)."""
    n = shape.numel()
    # Uniform over all 64 bits (random_() alone never sets the sign bit): four uniform int16 per draw.
    # Drawn from this thread's generator, if genreclf.twin gave it one (reproducible runs on two threads).
    generator = twin.thread_generator() if device.type == "cpu" else None
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None, generator=generator)
    return (bits.view(torch.int16)[:n] >= keep_threshold(p)).view(shape)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, p: float) -> Tensor:
        # One float mask holding 0 or 1 / (1 - p): multiplying by a bool mask converts it on every use.
        scaled = dropout_mask(x.shape, p, x.device).to(x.dtype).mul_(1.0 / (1.0 - p))
        ctx.save_for_backward(scaled)
        return x * scaled

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        (scaled,) = ctx.saved_tensors
        return grad * scaled, None


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Return F.dropout(x, p, training), with a cheaper mask on CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    return _Dropout.apply(x, p)


class Dropout(nn.Dropout):
    """nn.Dropout whose forward is `dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        """Return x with elements zeroed with probability p and the rest scaled by 1 / (1 - p) (training)."""
        return dropout(x, self.p, self.training)


# glibc's mallopt parameters (malloc.h), and what its dynamic thresholds reach once a process has
# freed large blocks (mmap threshold at its 32 MB cap, trim threshold twice that).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_MALLOC_AFTER = {_M_TRIM_THRESHOLD: 64 * 2**20, _M_MMAP_THRESHOLD: 32 * 2**20, _M_MMAP_MAX: 65536}


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def keep_freed_memory() -> Iterator[None]:
    """Within the block, glibc's malloc keeps freed memory for reuse (no mmap, no trimming); a no-op elsewhere.

    On leaving, mmap is allowed again and the kept memory returned to the OS; the thresholds are
    left where glibc's own adjustment takes them in a process that frees large blocks (once set,
    glibc adjusts them no more).
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        for param, value in _MALLOC_AFTER.items():
            libc.mallopt(param, value)
        libc.malloc_trim(0)
