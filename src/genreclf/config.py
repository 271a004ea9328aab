"""The settings of a training run, as frozen dataclasses: the CLI, the tests and the run folders read them.

Light on purpose (no torch, no Lightning), so that `genreclf train --help` can show the defaults at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from genreclf.errors import GenreclfError

SPLITS = ("official", "reference")  # FMA's artist-filtered set.split, or the reference study's random 80/20
# Where training reads the store's features: memory-mapped (none), read into process memory once (ram), or
# held on the training GPU, the crops cut there (gpu).
CACHES = ("none", "ram", "gpu")
# Lightning precisions; "auto": bf16-mixed on a CUDA GPU that supports bfloat16 (Ampere and later), else 32.
PRECISIONS = ("auto", "32", "bf16-mixed")


@dataclass(frozen=True)
class FitConfig:
    """How a run is fed and stopped (the optimiser is in TrainConfig / PretrainConfig)."""

    model: str = "gru"  # "gru" or "transformer"
    epochs: int = 100  # maximum number of epochs
    batch_size: int = 32  # the reference's batch size
    min_crop: int = 128  # shortest random training crop, in frames (the reference's 128-256)
    max_crop: int = 256  # longest random training crop, in frames
    val_crop: int = 256  # validation loss is measured on the centre crop of this many frames
    split: str = "official"  # "official" (FMA's artist-filtered set.split) or "reference" (random 80/20)
    seed: int = 0  # seeds the weights, the crops and the reference split
    # DataLoader worker processes reading the store; None: 0 on the CPU (a batch read whole costs the training
    # process ~0.4 ms; a worker's shared-memory copies and its share of the cores cost more), 1 on a GPU
    workers: int | None = None
    early_stopping: int = 0  # stop after this many epochs without a better val_loss (0: never)
    pretrained: str | None = None  # encoder.safetensors from `genreclf pretrain` (transformer only)
    accelerator: str = "auto"  # Lightning accelerator: auto, cpu, gpu
    devices: str = "1"  # Lightning devices per machine: 1 unless asked ("auto" takes every GPU); "4" for DDP on 4 GPUs
    num_nodes: int = 1  # machines; devices x num_nodes processes (launched by torchrun or srun) share each batch
    strategy: str = "auto"  # Lightning strategy: auto, or ddp (one process per device; gloo on CPU, NCCL on GPU)
    cache: str = "none"  # one of CACHES: "none" memory-maps the store; "ram" and "gpu" hold it whole
    precision: str = "auto"  # one of PRECISIONS: "auto" is bf16-mixed on a bfloat16 CUDA GPU, 32 elsewhere
    # A resumed run only: the learning rate from its next epoch on, the plateau schedule going on from it (after a
    # divergence, say); the optimiser's other state and the crops are the run's own. None: the checkpoint's.
    set_lr: float | None = None

    def __post_init__(self) -> None:
        if self.set_lr is not None and not (math.isfinite(self.set_lr) and self.set_lr > 0):
            raise GenreclfError(f"set_lr must be a positive learning rate, got {self.set_lr!r}")
        if self.cache not in CACHES:
            raise GenreclfError(f"unknown cache {self.cache!r}; use one of {', '.join(CACHES)}")
        if self.precision not in PRECISIONS:
            raise GenreclfError(f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")


# The training losses (genreclf.losses; README "Losses") and the TrainConfig fields that are each one's parameters.
LOSS_PARAMETERS = {
    "bce": ("pos_weight",),
    "focal": ("focal_gamma", "focal_alpha"),
    "asymmetric": ("asl_gamma_pos", "asl_gamma_neg", "asl_clip"),
    "lsep": (),
}
LOSSES = tuple(LOSS_PARAMETERS)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of supervised training (defaults: the reference's)."""

    lr: float = 1e-5  # Adam learning rate
    beta1: float = 0.9  # Adam beta_1
    beta2: float = 0.999  # Adam beta_2: Keras' default, as the reference's Adam(1e-5)
    eps: float = 1e-7  # Adam epsilon: Keras' default
    weight_decay: float = 0.0  # L2 penalty added by Adam (the reference uses none)
    loss: str = "bce"  # one of LOSSES; bce: the reference's positively weighted binary cross-entropy
    pos_weight: float = 4.0  # bce: weight of positive labels, the same for every genre
    focal_gamma: float = 2.0  # focal: exponent of (1 - p_t), the focusing on hard pairs (Lin et al.'s 2)
    focal_alpha: float | None = 0.25  # focal: weight of positives, 1 - alpha of negatives (Lin et al.'s); None: 1
    asl_gamma_pos: float = 0.0  # asymmetric: exponent of (1 - p) on positives (Ridnik et al.'s 0)
    asl_gamma_neg: float = 4.0  # asymmetric: exponent of p_m on negatives (Ridnik et al.'s 4)
    asl_clip: float = 0.05  # asymmetric: margin m, p_m = max(p - m, 0): negatives below m cost 0 (Ridnik et al.'s)
    plateau_factor: float = 0.1  # ReduceLROnPlateau: multiply lr by this (Keras default)
    plateau_patience: int = 20  # ReduceLROnPlateau: epochs without val_loss improvement
    min_lr: float = 1e-7  # ReduceLROnPlateau: lower bound of the lr

    def __post_init__(self) -> None:
        _check_optim(self)
        if not self.pos_weight > 0:
            raise GenreclfError(f"pos_weight must be > 0, got {self.pos_weight}")
        if self.loss not in LOSSES:
            raise GenreclfError(f"unknown loss {self.loss!r}; use one of {', '.join(LOSSES)}")
        for name in ("focal_gamma", "asl_gamma_pos", "asl_gamma_neg"):
            if not 0 <= getattr(self, name) < math.inf:
                raise GenreclfError(f"{name} must be a number >= 0, got {getattr(self, name)}")
        if self.focal_alpha is not None and not 0 < self.focal_alpha < 1:
            raise GenreclfError(f"focal_alpha must be in (0, 1) or None (no weighting), got {self.focal_alpha}")
        if not 0 <= self.asl_clip < 1:
            raise GenreclfError(f"asl_clip must be in [0, 1), got {self.asl_clip}")
        # A parameter of another loss would be recorded with the run but do nothing: refused, not ignored.
        defaults = {f.name: f.default for f in fields(TrainConfig)}
        for loss, names in LOSS_PARAMETERS.items():
            for name in names:
                if loss != self.loss and getattr(self, name) != defaults[name]:
                    raise GenreclfError(
                        f"{name}={getattr(self, name)} is a parameter of loss {loss!r}, not of {self.loss!r}; "
                        f"leave it at its default ({defaults[name]}) or train with loss {loss!r}"
                    )

    def loss_record(self) -> dict:
        """Return the loss and its parameters, {"loss": name, field: value, ...}: what a model file records."""
        return {"loss": self.loss, **{name: getattr(self, name) for name in LOSS_PARAMETERS[self.loss]}}


MASKINGS = ("span", "reference")  # pretraining masks: ours (spans, learned mask vector) or the reference's


@dataclass(frozen=True)
class PretrainConfig:
    """Masking and optimisation settings of masked-frame pretraining."""

    # "span": spans of mask_span frames, ~mask_ratio of them, replaced by a learned vector (the default: in
    # `genreclf demo --pretraining` neither masking fine-tuned clearly better, see README);
    # "reference": the reference's random_mask (a frame starts a mask with probability 0.1, a masked frame's
    # successor stays masked with probability 0.5 more: ~18% of frames in runs of 2.2), masked frames set to 0.
    masking: str = "span"
    mask_ratio: float = 0.15  # span masking: target fraction of real frames to mask (BERT's rate)
    mask_span: int = 8  # span masking: frames per masked span (~0.26 s); 1 masks single frames
    lr: float = 1e-4  # Adam learning rate (the reference's transformer_pretrain)
    beta1: float = 0.9  # Adam beta_1
    beta2: float = 0.999  # Adam beta_2: Keras' default, as the reference's Adam(1e-4) for pretraining
    eps: float = 1e-7  # Adam epsilon: Keras' default
    weight_decay: float = 0.0  # L2 penalty added by Adam
    plateau_factor: float = 0.1  # ReduceLROnPlateau: multiply lr by this
    plateau_patience: int = 20  # ReduceLROnPlateau: epochs without val_loss improvement
    min_lr: float = 1e-7  # ReduceLROnPlateau: lower bound of the lr

    def __post_init__(self) -> None:
        _check_optim(self)
        if not 0.0 < self.mask_ratio < 1.0:
            raise GenreclfError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.mask_span < 1:
            raise GenreclfError(f"mask_span must be >= 1, got {self.mask_span}")
        if self.masking not in MASKINGS:
            raise GenreclfError(f"unknown masking {self.masking!r}; use one of {', '.join(MASKINGS)}")


def _check_optim(cfg: TrainConfig | PretrainConfig) -> None:
    name = type(cfg).__name__
    if not cfg.lr > 0 or cfg.weight_decay < 0 or cfg.min_lr < 0:
        raise GenreclfError(f"{name}: lr must be > 0, weight_decay and min_lr >= 0; got {cfg}")
    if not 0.0 < cfg.plateau_factor < 1.0 or cfg.plateau_patience < 0:
        raise GenreclfError(f"{name}: plateau_factor must be in (0, 1) and plateau_patience >= 0; got {cfg}")
