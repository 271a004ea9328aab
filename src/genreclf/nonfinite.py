"""Stopping a training run at a non-finite loss, before it spoils the weights or a checkpoint.

A NaN or inf loss (NaN features in a corrupt store, a diverging learning rate) would otherwise train on
and write NaN weights into the checkpoints and model.safetensors. The run stops with a GenreclfError
instead: a training loss before the optimiser applies its step, a validation loss before the epoch's
checkpoints are written, so RUN/checkpoints/ keeps the last finished epoch for `--resume`.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from genreclf.errors import GenreclfError

if TYPE_CHECKING:  # annotations only: store imports pandas
    from genreclf.store import FeatureStore

NAMED_TRACKS = 5  # a message names at most this many tracks


class NonFiniteLoss(GenreclfError):
    """A loss or gradient is NaN or inf: raised by every DDP process at the same step."""


class StopOnNonFinite(Callback):
    """Raises NonFiniteLoss at a non-finite training loss or gradient, or validation loss.

    Every DDP process decides alike at the same step without a collective of its own: a non-finite
    loss turns its own process's gradients to NaN, which DDP's all-reduce of the gradients takes to
    every process, and val_loss is already the sum over the processes. The message names the tracks
    whose features are not finite, read again from the store (every process's share).
    """

    def __init__(self, last: Path):
        self.last = last  # RUN/checkpoints/last.ckpt
        self.loss: torch.Tensor | None = None
        self.batch_idx = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.batch_idx = batch_idx

    def on_before_backward(self, trainer, module, loss) -> None:
        self.loss = loss.detach()
        if loss.requires_grad:
            # On the device, without waiting for it: a non-finite loss makes its own gradient (1) NaN, and so
            # the parameters' (an l1 loss of a NaN target alone has finite ones, as sign(NaN) is 0).
            finite = torch.isfinite(self.loss)
            loss.register_hook(lambda grad: torch.where(finite, grad, torch.nan))

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads or torch.isfinite(torch.nn.utils.get_total_norm(grads)):  # the step's one wait for the device
            return
        loss = float(self.loss)
        what = f"training loss is {loss}" if not math.isfinite(loss) else "training gradients are not finite"
        what += f" in epoch {trainer.current_epoch + 1}, batch {self.batch_idx + 1} of {trainer.num_training_batches}"
        # The batch drawn again, by copies of the epoch's sampler: under DDP every process's share of it
        shares = _every_share(trainer.train_dataloader.sampler, epoch=trainer.current_epoch)
        batches = [next(itertools.islice(iter(share), self.batch_idx, None)) for share in shares]
        self._stop(trainer, what, trainer.train_dataloader.dataset.store, batches)

    def on_validation_end(self, trainer, module) -> None:
        loss = trainer.callback_metrics.get("val_loss")
        if loss is not None and not torch.isfinite(loss):
            loader = trainer.val_dataloaders
            what = f"validation loss is {float(loss)} after epoch {trainer.current_epoch + 1}"
            batches = itertools.chain.from_iterable(_every_share(loader.sampler))
            self._stop(trainer, what, loader.dataset.store, batches)

    def _stop(self, trainer, what: str, store: FeatureStore, batches: Iterable[list[tuple[int, ...]]]) -> NoReturn:
        """Raise NonFiniteLoss, naming the tracks of `batches` whose features are not finite."""
        bad = _nonfinite_tracks(store, batches)
        done = trainer.current_epoch  # epochs finished, each saved in last.ckpt
        kept = f"the weights of epoch {done} are kept in {self.last}"
        if not done:
            kept = "no epoch has finished, so none is saved"
        if bad:
            more = f" and {len(bad) - NAMED_TRACKS} more" if len(bad) > NAMED_TRACKS else ""
            named = ", ".join(str(t) for t in bad[:NAMED_TRACKS]) + more
            cause = f"the features of track{'s' if len(bad) > 1 else ''} {named} in {store.path} hold NaN or inf"
            fix = f"re-featurize the store, then {'--resume' if done else 'train again'}"
        else:
            cause = "the features of the crops are finite, so training diverged"
            fix = "--resume with a lower --set-lr" if done else "train again with a lower --lr"
        raise NonFiniteLoss(f"{what}: {cause}; {kept}; {fix}")


def _every_share(sampler, **state) -> list:
    """Return copies of a process's batch sampler, one for each DDP process (rank), with attributes `state`.

    genreclf.data.loader's `sampler` yields whole batches (its DataLoader has no batch_sampler of its own).
    """
    copies = [copy.copy(sampler) for _ in range(sampler.world_size)]
    for rank, share in enumerate(copies):
        vars(share).update(state, rank=rank)
    return copies


def _nonfinite_tracks(store: FeatureStore, batches: Iterable[list[tuple[int, ...]]]) -> list[int]:
    """Return the ids of the tracks whose crops, (position, start, length, ...) items, hold NaN or inf."""
    bad = {
        int(store.track_ids[p])
        for batch in batches
        for p, start, length, *_ in batch
        if not np.isfinite(store.item(p)[start : start + length]).all()
    }
    return sorted(bad)
