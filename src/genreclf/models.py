"""The two taggers of the reference study: a bidirectional GRU and a Transformer encoder.

Both read log-mel sequences (batch, frames, n_mels) of any length, ignore padded
frames when `lengths` is given, average over the real frames and return one logit
per genre. Read top to bottom: configs, small modules, full models, helpers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from genreclf import twin
from genreclf.audio import N_FRAMES
from genreclf.errors import GenreclfError
from genreclf.fastgru import fast_gru
from genreclf.fastops import Dropout, Linear, linear_relu

# ---------------------------------------------------------------------------
# Configs: the dimensions of a model, stored in every model file.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GRUConfig:
    """Dimensions of a GRUTagger (defaults: the reference's 768,595-parameter model)."""

    kind: ClassVar[str] = "gru"

    n_mels: int = 128  # input features per frame (mel bands)
    n_genres: int = 163  # outputs, one logit per FMA genre
    hidden: int = 128  # GRU units per direction
    n_layers: int = 2  # stacked bidirectional GRU layers
    dropout: float = 0.0  # between stacked GRU layers; the reference uses none
    pool_dropout: float = 0.2  # on the frame features before pooling, as the reference's Dropout(0.2)
    head_factor: int = 4  # hidden width of the tagging head, in multiples of n_genres

    def __post_init__(self) -> None:
        _check_positive(self, "n_mels", "n_genres", "hidden", "n_layers", "head_factor")
        _check_rate(self, "dropout")
        _check_rate(self, "pool_dropout")


@dataclass(frozen=True)
class TransformerConfig:
    """Dimensions of a TransformerTagger (defaults: the reference's 720,467-parameter model)."""

    kind: ClassVar[str] = "transformer"

    n_mels: int = 128  # input features per frame, also the model width (no input projection)
    n_genres: int = 163  # outputs, one logit per FMA genre
    n_layers: int = 4  # post-norm encoder layers
    n_heads: int = 8  # attention heads; must divide n_mels
    d_ff: int = 256  # width of the feed-forward block
    dropout: float = 0.3  # on the input and on both residual branches (TF tutorial style)
    ln_eps: float = 1e-6  # LayerNorm epsilon, as in the TF tutorial
    pool_dropout: float = 0.2  # on the frame features before pooling, as the reference's Dropout(0.2)
    head_factor: int = 4  # hidden width of the tagging head, in multiples of n_genres

    def __post_init__(self) -> None:
        _check_positive(self, "n_mels", "n_genres", "n_layers", "n_heads", "d_ff", "head_factor")
        _check_rate(self, "dropout")
        _check_rate(self, "pool_dropout")
        if self.n_mels % self.n_heads:
            raise GenreclfError(f"TransformerConfig: n_heads={self.n_heads} must divide n_mels={self.n_mels}")
        if not self.ln_eps > 0:
            raise GenreclfError(f"TransformerConfig: ln_eps must be > 0, got {self.ln_eps}")


ModelConfig = GRUConfig | TransformerConfig
CONFIG_KINDS: dict[str, type] = {c.kind: c for c in (GRUConfig, TransformerConfig)}


def _check_positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not value > 0:
            raise GenreclfError(f"{type(cfg).__name__}: {name} must be > 0, got {value}")


def _check_rate(cfg: Any, name: str) -> None:
    value = getattr(cfg, name)
    if not 0.0 <= value < 1.0:
        raise GenreclfError(f"{type(cfg).__name__}: {name} must be in [0, 1), got {value}")


# ---------------------------------------------------------------------------
# Small modules
# ---------------------------------------------------------------------------


def frame_mask(lengths: Tensor | None, batch: int, frames: int, device: torch.device) -> Tensor:
    """Return a (batch, frames) bool mask, True on real frames."""
    if lengths is None:
        return torch.ones(batch, frames, dtype=torch.bool, device=device)
    return torch.arange(frames, device=device) < lengths.to(device).unsqueeze(1)


def unless_whole(lengths: Tensor | None, frames: int) -> Tensor | None:
    """Return lengths, or None where every sequence is whole (as long as the frames): no padding to mask."""
    return None if lengths is None or bool((lengths >= frames).all()) else lengths


def masked_mean(h: Tensor, mask: Tensor) -> Tensor:
    """Return the mean of h (batch, frames, dim) over the frames where mask is True."""
    # where(), not h * mask: padding may hold NaN/inf and 0 * inf is NaN.
    total = torch.where(mask.unsqueeze(-1), h, torch.zeros((), dtype=h.dtype, device=h.device))
    return total.sum(1) / mask.sum(1, keepdim=True).clamp(min=1).to(h.dtype)


def sinusoidal_encoding(frames: int, dim: int) -> Tensor:
    """Return the (frames, dim) float32 sin/cos positional encoding of the TF transformer tutorial, on the CPU."""
    # float64 like the tutorial's numpy (sin(938 rad) in float32 is off by ~1e-4), and on the CPU
    # because some accelerators (MPS) have no float64.
    pos = torch.arange(frames, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(dim)
    angles = pos / torch.pow(10000.0, (2 * (i // 2)).to(torch.float64) / dim)
    # Interleaved: sin on even indices, cos on odd ones.
    return torch.where(i % 2 == 0, torch.sin(angles), torch.cos(angles)).float()


class TaggingHead(nn.Module):
    """Pooled features -> Dense(head_factor * n_genres, SELU) -> Dense(n_genres) logits."""

    def __init__(self, d_in: int, n_genres: int, head_factor: int):
        super().__init__()
        self.fc = Linear(d_in, head_factor * n_genres)
        self.out = Linear(head_factor * n_genres, n_genres)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits (batch, n_genres)."""
        return self.out(F.selu(self.fc(x)))


class SelfAttention(nn.Module):
    """Multi-head self-attention with a key padding mask and no attention dropout."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        """Return (batch, frames, dim); key_mask (batch, frames) is True on real frames."""
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in self.qkv(x).split(d, dim=2))
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    """Position-wise Dense(d_ff, ReLU) -> Dense(dim), no inner dropout (TF tutorial)."""

    def __init__(self, dim: int, d_ff: int):
        super().__init__()
        self.fc = Linear(dim, d_ff)
        self.proj = Linear(d_ff, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Return (batch, frames, dim)."""
        return self.proj(linear_relu(x, self.fc.weight, self.fc.bias))


class EncoderLayer(nn.Module):
    """Post-norm encoder layer: LN(x + drop(attn(x))), then LN(h + drop(ffn(h)))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attn = SelfAttention(cfg.n_mels, cfg.n_heads)
        self.ln1 = nn.LayerNorm(cfg.n_mels, eps=cfg.ln_eps)
        self.ffn = FeedForward(cfg.n_mels, cfg.d_ff)
        self.ln2 = nn.LayerNorm(cfg.n_mels, eps=cfg.ln_eps)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        """Return (batch, frames, dim)."""
        x = self.ln1(x + self.drop(self.attn(x, key_mask)))
        return self.ln2(x + self.drop(self.ffn(x)))


class TransformerEncoder(nn.Module):
    """x * sqrt(dim) + positional encoding -> dropout -> n_layers encoder layers."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.scale = math.sqrt(cfg.n_mels)
        self.drop = Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))
        # Built once, for a whole clip; not persistent, so model files hold only the weights.
        self.register_buffer("pe", sinusoidal_encoding(N_FRAMES, cfg.n_mels), persistent=False)

    def positions(self, frames: int) -> Tensor:
        """Return the (frames, dim) positional encoding, on the buffer's device."""
        if frames > len(self.pe):  # longer than a clip (predict on a whole track): extend once
            self.pe = sinusoidal_encoding(frames, self.pe.shape[1]).to(self.pe.device)
        return self.pe[:frames]

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Return per-frame features (batch, frames, n_mels); padded frames hold junk."""
        b, t, _ = x.shape
        # No mask when every sequence is whole (training crops, prediction's crops): same outputs, and
        # attention without a mask takes a faster kernel (4% of a forward pass on a CPU).
        lengths = unless_whole(lengths, t)
        mask = None if lengths is None else frame_mask(lengths, b, t, x.device)
        if mask is not None:
            # Zero the padding so that NaN/inf there cannot leak through 0-weight attention.
            x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
        x = x * self.scale + self.positions(t).to(x.device, x.dtype)
        x = self.drop(x)
        for layer in self.layers:
            x = layer(x, mask)
        return x


class FrameReconstructionHead(nn.Module):
    """Encoder features -> reconstructed log-mel frames, for masked-frame pretraining."""

    def __init__(self, n_mels: int = 128):
        super().__init__()
        self.proj = Linear(n_mels, n_mels)

    def forward(self, h: Tensor) -> Tensor:
        """Return predicted frames (batch, frames, n_mels)."""
        return self.proj(h)


# ---------------------------------------------------------------------------
# Full models
# ---------------------------------------------------------------------------


class GRUTagger(nn.Module):
    """Stacked bidirectional GRU -> mean over real frames -> tagging head (logits)."""

    def __init__(self, cfg: GRUConfig, initialise: bool = True):
        super().__init__()
        self.cfg = cfg
        self.gru = nn.GRU(
            cfg.n_mels,
            cfg.hidden,
            num_layers=cfg.n_layers,
            batch_first=True,
            bidirectional=True,
            dropout=cfg.dropout if cfg.n_layers > 1 else 0.0,
        )
        self.pool_drop = Dropout(cfg.pool_dropout)
        self.head = TaggingHead(2 * cfg.hidden, cfg.n_genres, cfg.head_factor)
        if initialise:  # not when weights are loaded next: its QR decompositions took 0.25 s of `predict`
            init_keras_style(self)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Return logits (batch, n_genres) for x (batch, frames, n_mels), 1 <= lengths <= frames."""
        b, t, _ = x.shape
        lengths = unless_whole(lengths, t)
        if lengths is None:
            # On the CPU our own bidirectional layers (same parameters, same function) train ~2x faster; without
            # gradients, within a fit's twin.side_by_side (validation: one intra-op thread) too (batch 32 of 256
            # frames: 85 ms where nn.GRU took 118), elsewhere (evaluate, predict) nn.GRU's forward is faster.
            fast = x.device.type == "cpu" and (torch.is_grad_enabled() or twin.paired())
            h = fast_gru(self.gru, x) if fast else self.gru(x)[0]
            return self.head(self.pool_drop(h).mean(1))
        # Packing keeps the backward direction from starting in the padding.
        lengths_cpu = lengths.detach().to("cpu", torch.int64)
        if lengths_cpu.min() < 1:
            raise ValueError(f"lengths must be >= 1, got {lengths_cpu.tolist()}")
        packed = pack_padded_sequence(x, lengths_cpu, batch_first=True, enforce_sorted=False)
        h, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=t)
        return self.head(masked_mean(self.pool_drop(h), frame_mask(lengths, b, t, x.device)))


class TransformerTagger(nn.Module):
    """Transformer encoder over mel frames -> mean over real frames -> tagging head (logits)."""

    def __init__(self, cfg: TransformerConfig, initialise: bool = True):
        super().__init__()
        self.cfg = cfg
        self.encoder = TransformerEncoder(cfg)
        self.pool_drop = Dropout(cfg.pool_dropout)
        self.head = TaggingHead(cfg.n_mels, cfg.n_genres, cfg.head_factor)
        if initialise:  # not when weights are loaded next: its QR decompositions took 0.25 s of `predict`
            init_keras_style(self)

    def encode(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Return per-frame encoder features (batch, frames, n_mels)."""
        return self.encoder(x, lengths)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Return logits (batch, n_genres) for x (batch, frames, n_mels), 1 <= lengths <= frames."""
        b, t, _ = x.shape
        lengths = unless_whole(lengths, t)  # whole crops: no mask in the encoder, nor in the mean
        h = self.pool_drop(self.encode(x, lengths))
        if lengths is None:
            return self.head(h.sum(1) / t)  # as masked_mean computes it, without a pass to mask nothing
        return self.head(masked_mean(h, frame_mask(lengths, b, t, x.device)))

    def load_encoder_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load pretrained `encoder.*` weights (strictly); the tagging head keeps its init."""
        prefix = "encoder."
        stray = sorted(k for k in state if not k.startswith(prefix))
        if stray:
            raise GenreclfError(f"not encoder weights (unexpected keys {stray[:3]}...)")
        try:
            self.encoder.load_state_dict({k[len(prefix) :]: v for k, v in state.items()})
        except RuntimeError as e:
            raise GenreclfError(f"pretrained encoder weights do not fit this TransformerConfig: {e}") from None


def init_keras_style(model: nn.Module) -> None:
    """Initialise in place like Keras' defaults: Glorot kernels, orthogonal recurrences, zero biases."""
    # The reference is Keras; PyTorch's default inits differ and training at lr 1e-5 is sensitive.
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.GRU):
            for name, p in module.named_parameters():
                if name.startswith("weight_ih"):
                    nn.init.xavier_uniform_(p)
                elif name.startswith("weight_hh"):
                    nn.init.orthogonal_(p)
                else:
                    nn.init.zeros_(p)
    for module in model.modules():
        if isinstance(module, SelfAttention):
            # Keras has separate q/k/v Dense layers: Glorot per (dim, dim) block.
            for w in module.qkv.weight.data.chunk(3, dim=0):
                nn.init.xavier_uniform_(w)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def model_from_config(cfg: ModelConfig, initialise: bool = True) -> nn.Module:
    """Return a freshly initialised model for a config (initialise=False: for weights loaded next)."""
    if isinstance(cfg, GRUConfig):
        return GRUTagger(cfg, initialise)
    if isinstance(cfg, TransformerConfig):
        return TransformerTagger(cfg, initialise)
    raise TypeError(f"not a model config: {cfg!r}")


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """Return a JSON-serialisable dict of a model config, with its "kind"."""
    return {"kind": cfg.kind, **dataclasses.asdict(cfg)}


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Return the model config described by a dict from `config_to_dict` (missing keys: defaults)."""
    if not isinstance(d, dict):
        raise GenreclfError(f"model config must be a dict, got {type(d).__name__}")
    kind = d.get("kind")
    if kind not in CONFIG_KINDS:
        raise GenreclfError(f"unknown model kind {kind!r}; expected one of {sorted(CONFIG_KINDS)}")
    cls = CONFIG_KINDS[kind]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields) - {"kind"})
    if unknown:
        raise GenreclfError(f"unknown key(s) {unknown} in {kind} model config; known keys: {sorted(fields)}")
    for name, value in d.items():
        if name == "kind":
            continue
        want = fields[name].type
        ok = (
            isinstance(value, int) and not isinstance(value, bool)
            if want == "int"
            else isinstance(value, (int, float)) and not isinstance(value, bool)
        )
        if not ok:
            raise GenreclfError(f"{kind} model config: {name} must be {want}, got {value!r}")
    return cls(**{k: v for k, v in d.items() if k != "kind"})


def count_parameters(model: nn.Module) -> int:
    """Return the number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
