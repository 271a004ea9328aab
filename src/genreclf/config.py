"""The settings of a training run, as frozen dataclasses: the CLI, the tests and the run folders read them.

Light on purpose (no torch, no Lightning), so that `genreclf train --help` can show the defaults at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from genreclf.errors import GenreclfError

SPLITS = ("official", "reference")  # FMA's artist-filtered set.split, or the reference study's random 80/20


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
    workers: int = 1  # DataLoader worker processes reading the memory-mapped store
    early_stopping: int = 0  # stop after this many epochs without a better val_loss (0: never)
    pretrained: str | None = None  # encoder.safetensors from `genreclf pretrain` (transformer only)
    accelerator: str = "auto"  # Lightning accelerator: auto, cpu, gpu
    devices: str = "1"  # Lightning devices per machine: 1 unless asked ("auto" takes every GPU); "4" for DDP on 4 GPUs
    num_nodes: int = 1  # machines; devices x num_nodes processes (launched by torchrun or srun) share each batch
    strategy: str = "auto"  # Lightning strategy: auto, or ddp (one process per device; gloo on CPU, NCCL on GPU)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of supervised training (defaults: the reference's)."""

    lr: float = 1e-5  # Adam learning rate
    beta1: float = 0.9  # Adam beta_1
    beta2: float = 0.999  # Adam beta_2: Keras' default, as the reference's Adam(1e-5)
    eps: float = 1e-7  # Adam epsilon: Keras' default
    weight_decay: float = 0.0  # L2 penalty added by Adam (the reference uses none)
    pos_weight: float = 4.0  # BCE weight of positive labels, the same for every genre
    plateau_factor: float = 0.1  # ReduceLROnPlateau: multiply lr by this (Keras default)
    plateau_patience: int = 20  # ReduceLROnPlateau: epochs without val_loss improvement
    min_lr: float = 1e-7  # ReduceLROnPlateau: lower bound of the lr

    def __post_init__(self) -> None:
        _check_optim(self)
        if not self.pos_weight > 0:
            raise GenreclfError(f"pos_weight must be > 0, got {self.pos_weight}")


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
