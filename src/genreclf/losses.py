"""Training losses for multi-label tagging, on logits (batch, genres) and 0/1 targets of the same shape.

Each returns one number for the batch: the per-(clip, genre) losses summed over the genres and averaged
over the clips (the reference's reduction), or, for lsep, its per-clip ranking loss averaged over the clips.
All work in log-sigmoid space, in the logits' dtype (float32 or float64), with finite gradients at any logit.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from genreclf.config import TrainConfig


def weighted_bce(logits: Tensor, targets: Tensor, pos_weight: float) -> Tensor:
    """Return BCE-with-logits summed over genres and averaged over clips, positives weighted by pos_weight.

    The reference's loss: K.sum(-(4 y log p + (1 - y) log(1 - p)), axis=-1), averaged over the batch.
    """
    pw = torch.full((logits.shape[-1],), float(pos_weight), dtype=logits.dtype, device=logits.device)
    per_pair = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), pos_weight=pw, reduction="none")
    return per_pair.sum(-1).mean()


def focal_loss(logits: Tensor, targets: Tensor, gamma: float = 2.0, alpha: float | None = 0.25) -> Tensor:
    """Return the sigmoid focal loss (Lin et al. 2017) summed over genres and averaged over clips.

    Per (clip, genre): -alpha_t (1 - p_t)^gamma log p_t, where p_t is p = sigmoid(logit) for a positive
    and 1 - p for a negative, alpha_t is alpha for a positive and 1 - alpha for a negative (1 if alpha is None).
    """
    y = targets.to(logits.dtype)
    log_p, log_q = F.logsigmoid(logits), F.logsigmoid(-logits)  # log p, log (1 - p)
    # (1 - p)^gamma as exp(gamma log(1 - p)): finite gradients where p rounds to 0 or 1, for any gamma >= 0.
    pos = (gamma * log_q).exp() * log_p
    neg = (gamma * log_p).exp() * log_q
    a_pos, a_neg = (1.0, 1.0) if alpha is None else (alpha, 1.0 - alpha)
    return -(a_pos * y * pos + a_neg * (1 - y) * neg).sum(-1).mean()


def asymmetric_loss(
    logits: Tensor, targets: Tensor, gamma_pos: float = 0.0, gamma_neg: float = 4.0, clip: float = 0.05
) -> Tensor:
    """Return the asymmetric loss (ASL, Ridnik et al. 2021) summed over genres and averaged over clips.

    Per (clip, genre): -(1 - p)^gamma_pos log p for a positive, -p_m^gamma_neg log(1 - p_m) for a negative,
    with p = sigmoid(logit) and p_m = max(p - clip, 0): negatives below `clip` cost nothing.
    """
    y = targets.to(logits.dtype)
    log_p, log_q = F.logsigmoid(logits), F.logsigmoid(-logits)
    pos = (gamma_pos * log_q).exp() * log_p
    if clip == 0:
        neg = (gamma_neg * log_p).exp() * log_q
    else:
        p_m = (torch.sigmoid(logits) - clip).clamp(min=0)
        log_q_m = torch.log(torch.sigmoid(-logits) + clip).clamp(max=0)  # log(1 - p_m); 1 - p_m >= clip
        # Where p_m = 0 the term is 0 whatever its weight: a weight of 0 there keeps p_m^gamma's gradient
        # (infinite at 0 for gamma < 1, times 0: NaN) out of the backward pass.
        live = p_m > 0
        weight = torch.where(live, torch.where(live, p_m, 1.0).pow(gamma_neg), 0.0)
        neg = weight * log_q_m
    return -(y * pos + (1 - y) * neg).sum(-1).mean()


def lsep_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Return the LSEP pairwise ranking loss (Li et al. 2017) averaged over clips.

    Per clip: log(1 + sum over negative genres v and positive genres u of exp(f_v - f_u)); a clip without a
    positive or without a negative genre has no pair and contributes 0 (it still counts in the mean).
    The double sum factorises: log sum_{v,u} exp(f_v - f_u) = logsumexp_v f_v + logsumexp_u (-f_u).
    """
    positive = targets > 0.5
    # Genres outside a sum get a very negative finite logit, not -inf: a logsumexp over -inf alone has a NaN
    # in its backward pass. exp of it minus a real logit is 0, and a clip with an empty sum is set to 0 below.
    low = torch.finfo(logits.dtype).min / 4
    over_neg = torch.where(positive, low, logits).logsumexp(-1)
    over_pos = torch.where(positive, -logits, low).logsumexp(-1)
    per_clip = F.softplus(over_neg + over_pos)  # log(1 + exp(.)): the "1 +" is the 0 term of a logsumexp
    paired = positive.any(-1) & ~positive.all(-1)
    return torch.where(paired, per_clip, 0.0).mean()


def criterion(cfg: TrainConfig) -> Callable[[Tensor, Tensor], Tensor]:
    """Return the loss named by cfg.loss as a function of (logits, targets), with cfg's parameters."""
    # partial, not lambda: a module holding it still pickles (ddp_spawn)
    if cfg.loss == "bce":
        return partial(weighted_bce, pos_weight=cfg.pos_weight)
    if cfg.loss == "focal":
        return partial(focal_loss, gamma=cfg.focal_gamma, alpha=cfg.focal_alpha)
    if cfg.loss == "asymmetric":
        return partial(asymmetric_loss, gamma_pos=cfg.asl_gamma_pos, gamma_neg=cfg.asl_gamma_neg, clip=cfg.asl_clip)
    if cfg.loss == "lsep":
        return lsep_loss
    raise ValueError(f"no loss function for {cfg.loss!r}")  # TrainConfig accepts only config.LOSSES
