"""LightningModules: supervised tagging (the loss TrainConfig names: genreclf.losses) and masked-frame pretraining.

Batches are dicts {"x": float32 (B, T, n_mels), "lengths": int64 (B,), "y": float32 (B, G)};
"lengths" may be left out when every frame is real, "y" is not needed for pretraining.
Hyperparameters are saved as plain dicts, so a `.ckpt` resumes and reloads with
`load_from_checkpoint` without unpickling our classes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genreclf import twin
from genreclf.config import PretrainConfig, TrainConfig
from genreclf.errors import GenreclfError
from genreclf.fastops import keep_freed_memory
from genreclf.losses import criterion
from genreclf.models import (
    FrameReconstructionHead,
    GRUTagger,
    ModelConfig,
    TransformerConfig,
    TransformerEncoder,
    config_from_dict,
    config_to_dict,
    init_keras_style,
    model_from_config,
)


def span_mask(
    lengths: Tensor,
    frames: int,
    ratio: float,
    span: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Return a (batch, frames) bool mask: random spans covering ~ratio of each clip's real frames."""
    # Spans may overlap, so the masked fraction is at most ceil(ratio * length / span) * span.
    lengths = lengths.to(torch.int64)
    device = lengths.device
    span_len = torch.clamp(lengths, max=span)  # a clip shorter than a span gets one shorter span
    n_spans = torch.ceil(ratio * lengths / span_len).to(torch.int64).clamp(min=1)
    n_max = int(n_spans.max())
    u = torch.rand(lengths.shape[0], n_max, device=device, generator=generator)
    starts = (u * (lengths - span_len + 1).unsqueeze(1)).to(torch.int64)
    offsets = torch.arange(span, device=device)
    pos = starts.unsqueeze(-1) + offsets  # (B, n_max, span)
    span_ids = torch.arange(n_max, device=device)
    keep = (offsets < span_len[:, None, None]) & (span_ids[None, :, None] < n_spans[:, None, None])
    mask = torch.zeros(lengths.shape[0], frames + 1, dtype=torch.bool, device=device)
    # Dropped positions go to the spare column `frames`, cut off below.
    pos = torch.where(keep, pos, torch.full_like(pos, frames))
    mask.scatter_(1, pos.flatten(1), True)
    return mask[:, :frames]


REFERENCE_START = 0.1  # the reference's random_mask: probability that a frame starts a masked run
REFERENCE_CONTINUE = 0.5  # ... and that a masked frame's successor is masked too (besides starting its own)


def reference_mask(lengths: Tensor, frames: int, generator: torch.Generator | None = None) -> Tensor:
    """Return a (batch, frames) bool mask drawn as the reference's random_mask, on real frames only.

    Frame t is masked if it starts a run (probability REFERENCE_START) or if frame t-1 is masked and a
    REFERENCE_CONTINUE coin says go on: a Markov chain with P(masked | previous masked) = 0.55, so
    ~18% of frames are masked, in runs of 2.2 frames on average.
    """
    b, device = lengths.shape[0], lengths.device
    starts = torch.rand(b, frames, device=device, generator=generator) < REFERENCE_START
    goes_on = torch.rand(b, frames, device=device, generator=generator) < REFERENCE_CONTINUE
    index = torch.arange(frames, device=device).expand(b, frames)
    none = torch.full_like(index, -1)
    # Masked iff the latest start at or before t comes after the latest frame whose coin said stop.
    last_start = torch.where(starts, index, none).cummax(1).values
    last_stop = torch.where(goes_on, none, index).cummax(1).values
    masked = (last_start >= 0) & (last_start >= last_stop)
    return masked & (index < lengths.to(torch.int64).unsqueeze(1))


def _adam_with_plateau(module: L.LightningModule, cfg: TrainConfig | PretrainConfig) -> dict[str, Any]:
    """Return Lightning's optimiser dict: Adam + ReduceLROnPlateau on val_loss."""
    params = list(module.parameters())
    opt = torch.optim.Adam(
        params,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        # The same update; on the CPU the fused kernel takes ~0.5 ms a step where the per-tensor loop takes ~4.
        fused=True if params and all(p.device.type == "cpu" for p in params) else None,
    )
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt,
        mode="min",
        factor=cfg.plateau_factor,
        patience=cfg.plateau_patience,
        min_lr=cfg.min_lr,
    )
    # strict=False: a run without validation data just keeps its lr (Lightning warns).
    return {
        "optimizer": opt,
        "lr_scheduler": {
            "scheduler": sched,
            "monitor": "val_loss",
            "interval": "epoch",
            "strict": False,
        },
    }


def _log_train_loss(module: L.LightningModule, loss: Tensor, clips: int) -> None:
    # Lightning sums loss x clips and clips on each process and divides their means over the processes: the
    # epoch's mean over all clips, exactly as one process computes it, as every process trains on as many clips.
    module.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=clips)


class _ValidationLoss:
    """Logs val_loss at the end of validation: the mean over every validation clip, however they were shared.

    Not Lightning's sync_dist mean, which averages the processes' integer clip counts with integer division
    (1 clip on 2 processes counts as 0): each process sums loss x clips and clips, and the sums are summed.
    """

    _val_sums: Tensor | None = None

    def _add_val_loss(self, loss: Tensor, clips: int) -> None:
        sums = torch.stack([loss.detach().float() * clips, torch.tensor(float(clips), device=loss.device)])
        self._val_sums = sums if self._val_sums is None else self._val_sums + sums

    def on_validation_epoch_end(self) -> None:
        sums = self._val_sums if self._val_sums is not None else torch.zeros(2, device=self.device)
        self._val_sums = None
        total = self.trainer.strategy.reduce(sums, reduce_op="sum")  # one process: itself
        self.log("val_loss", total[0] / total[1], prog_bar=True)


def _counted(batch: dict[str, Tensor]) -> Tensor:
    """Return the batch's (B,) bool flags of clips that count: False on duplicates that pad a DDP rank's share."""
    counted = batch.get("counted")
    return torch.ones(len(batch["x"]), dtype=torch.bool, device=batch["x"].device) if counted is None else counted


def _as_model_config(cfg: ModelConfig | dict[str, Any]) -> ModelConfig:
    return config_from_dict(cfg) if isinstance(cfg, dict) else cfg


def _as_dataclass(cls: type, cfg: Any) -> Any:
    if cfg is None:
        return cls()
    if isinstance(cfg, cls):
        return cfg
    if isinstance(cfg, dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise GenreclfError(f"unknown key(s) {unknown} in {cls.__name__}; known keys: {sorted(known)}")
        return cls(**cfg)
    raise TypeError(f"expected {cls.__name__} or dict, got {type(cfg).__name__}")


@contextlib.contextmanager
def cpu_fit(module: nn.Module) -> Iterator[None]:
    """What a fit of `module` on the CPU runs inside (genreclf.train): `keep_freed_memory` (no page faults for
    every step's activations) and, where the fit has two halves of the work to run side by side (a GRU's
    directions, a TaggerModule's batch halves), `twin.side_by_side` (one core each)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(keep_freed_memory())
        if isinstance(module, TaggerModule) or any(isinstance(m, nn.GRU) for m in module.modules()):
            stack.enter_context(twin.side_by_side())
        yield


class _GradientsOf(torch.autograd.Function):
    """A loss of the given value whose backward gives `params` the gradients computed already (times its own)."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, grads: tuple[Tensor | None, ...], *params: Tensor) -> Tensor:
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        # grad is 1 from Lightning's backward (the gradients as they are: no pass over them on the step's one
        # busy thread), NaN where genreclf.nonfinite has found the loss not finite
        if grad.device.type == "cpu" and grad.numel() == 1 and grad.item() == 1.0:
            return None, None, *ctx.grads
        return None, None, *(None if g is None else g * grad for g in ctx.grads)


def loss_in_halves(
    loss: Callable[[dict[str, Tensor]], Tensor], batch: dict[str, Tensor], params: list[Tensor]
) -> Tensor:
    """Return loss(batch), a mean over the batch's clips, computed as two halves side by side (genreclf.twin).

    Each half's loss (weighted by its share of the clips) and, with grad enabled, its gradients are computed on
    a thread of its own, its dropout masks drawn from a generator seeded from torch's (so a run is reproducible);
    the gradients are summed, the gradient of the whole batch's mean loss, as DDP's processes make it. The loss
    returned gives `params` that gradient on backward.
    """
    n = len(batch["x"])
    h = n // 2
    halves = [{k: v[:h] for k, v in batch.items()}, {k: v[h:] for k, v in batch.items()}]
    seeds = torch.randint(0, 2**62, (2,)).tolist()  # from torch's generator, in this thread: reproducible

    def half(part: dict[str, Tensor], share: float, seed: int) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        with twin.generator(seed):
            value = loss(part) * share
        if not torch.is_grad_enabled():
            return value, ()
        return value.detach(), torch.autograd.grad(value, params, allow_unused=True)

    (a, ga), (b, gb) = twin.pair(half, (halves[0], h / n, seeds[0]), (halves[1], (n - h) / n, seeds[1]))
    if not torch.is_grad_enabled():
        return a + b
    grads = tuple(x if y is None else y if x is None else x + y for x, y in zip(ga, gb))
    return _GradientsOf.apply(a + b, grads, *params)


class TaggerModule(_ValidationLoss, L.LightningModule):
    """Supervised multi-label training of a GRUTagger or TransformerTagger."""

    def __init__(
        self,
        model_config: ModelConfig | dict[str, Any],
        train_config: TrainConfig | dict[str, Any] | None = None,
    ):
        super().__init__()
        self.model_config = _as_model_config(model_config)
        self.train_config: TrainConfig = _as_dataclass(TrainConfig, train_config)
        self.save_hyperparameters(
            {
                "model_config": config_to_dict(self.model_config),
                "train_config": dataclasses.asdict(self.train_config),
            }
        )
        self.model = model_from_config(self.model_config)
        self.criterion = criterion(self.train_config)  # by the name in train_config.loss

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Return logits (batch, n_genres)."""
        return self.model(x, lengths)

    def _loss(self, batch: dict[str, Tensor]) -> Tensor:
        logits = self.model(batch["x"], batch.get("lengths"))
        return self.criterion(logits, batch["y"])

    def batch_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Return the loss of a batch: in two halves side by side during a CPU fit, except for a GRU, whose two
        directions run side by side already (genreclf.fastgru)."""
        if twin.paired() and len(batch["x"]) > 1 and not isinstance(self.model, GRUTagger):
            return loss_in_halves(self._loss, batch, [p for p in self.parameters() if p.requires_grad])
        return self._loss(batch)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Return the training loss of one batch."""
        loss = self.batch_loss(batch)
        _log_train_loss(self, loss, len(batch["x"]))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Log the training loss of one validation batch, over its counted clips."""
        counted = _counted(batch)
        clips = int(counted.sum())
        # DDP's padding duplicates are left out; a rank's share of a tiny set can be duplicates only: 0 over 0 clips.
        loss = self.batch_loss({k: v[counted] for k, v in batch.items()}) if clips else batch["x"].new_zeros(())
        self._add_val_loss(loss, clips)

    def on_train_epoch_end(self) -> None:
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_epoch=True)

    def configure_optimizers(self) -> dict[str, Any]:
        return _adam_with_plateau(self, self.train_config)


class PretrainModule(_ValidationLoss, L.LightningModule):
    """Masked-frame pretraining of a TransformerTagger's encoder.

    Masked real frames (random spans, replaced by a learned mask vector; or, with masking="reference",
    the reference's random_mask, set to 0) go in; the encoder and a FrameReconstructionHead predict the
    original frames; the loss is the mean absolute error (the reference's) over masked real frames only.
    `encoder_state_dict()` gives weights for `TransformerTagger.load_encoder_state_dict`.
    """

    def __init__(
        self,
        model_config: TransformerConfig | dict[str, Any],
        pretrain_config: PretrainConfig | dict[str, Any] | None = None,
    ):
        super().__init__()
        self.model_config = _as_model_config(model_config)
        if not isinstance(self.model_config, TransformerConfig):
            raise GenreclfError(
                f"masked-frame pretraining needs a transformer model config, got kind {self.model_config.kind!r}"
            )
        self.pretrain_config: PretrainConfig = _as_dataclass(PretrainConfig, pretrain_config)
        self.save_hyperparameters(
            {
                "model_config": config_to_dict(self.model_config),
                "pretrain_config": dataclasses.asdict(self.pretrain_config),
            }
        )
        n_mels = self.model_config.n_mels
        # Same attribute name as in TransformerTagger, so keys are "encoder.*" in both.
        self.encoder = TransformerEncoder(self.model_config)
        # Learned rather than 0: zero is an ordinary log-mel value (-40 dB below the clip's peak).
        # Unused by the reference's masking (masked frames set to 0): frozen then, as DDP waits for every
        # trainable parameter's gradient.
        self.mask_vector = nn.Parameter(torch.zeros(n_mels), requires_grad=self.pretrain_config.masking == "span")
        self.recon = FrameReconstructionHead(n_mels)
        init_keras_style(self)

    def masked_loss(
        self,
        x: Tensor,
        lengths: Tensor | None,
        generator: torch.Generator | None = None,
        counted: Tensor | None = None,
    ) -> Tensor:
        """Return the mean absolute error (the reference's pretraining loss) over masked real frames.

        `counted` (B,) bool leaves out clips that do not count (DDP's padding duplicates in validation).
        """
        b, t, _ = x.shape
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.int64, device=x.device)
        cfg = self.pretrain_config
        if cfg.masking == "reference":
            mask = reference_mask(lengths, t, generator)
            fill = torch.zeros((), dtype=x.dtype, device=x.device)
        else:
            mask = span_mask(lengths, t, cfg.mask_ratio, cfg.mask_span, generator)  # real frames only
            fill = self.mask_vector.to(x.dtype)
        if counted is not None:
            mask &= counted.unsqueeze(1)
        if not mask.any():  # a batch of very short crops can draw no mask at all: nothing to reconstruct
            mask[:, 0] = lengths > 0
        x_in = torch.where(mask.unsqueeze(-1), fill, x)
        pred = self.recon(self.encoder(x_in, lengths))
        return F.l1_loss(pred[mask], x[mask])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Return the masked-frame mean absolute error of one batch."""
        loss = self.masked_loss(batch["x"], batch.get("lengths"))
        _log_train_loss(self, loss, len(batch["x"]))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Log the masked-frame mean absolute error of one validation batch."""
        # The same masks every epoch, so that val_loss moves only when the model does.
        gen = torch.Generator(device=batch["x"].device).manual_seed(batch_idx)
        counted = _counted(batch)
        loss = self.masked_loss(batch["x"], batch.get("lengths"), gen, counted)
        self._add_val_loss(loss, int(counted.sum()))  # a batch of duplicates only: 0 clips

    def on_train_epoch_end(self) -> None:
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_epoch=True)

    def configure_optimizers(self) -> dict[str, Any]:
        return _adam_with_plateau(self, self.pretrain_config)

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """Return detached copies of the encoder weights, keyed as in TransformerTagger ("encoder.*")."""
        return {f"encoder.{k}": v.detach().clone() for k, v in self.encoder.state_dict().items()}
