"""A training run's batches as a LightningDataModule: its two loaders, the --cache, and where crops are cut.

Lightning calls the hooks below on every process once that process's device is set (under DDP each
process has its own), so a cache is built where it is used: `setup` reads the store into this process's
memory (cache "ram") or copies its float16 features onto this process's GPU (cache "gpu"), and
`transfer_batch_to_device` then cuts each batch's crops on the GPU from the batch's index tensors.
Lightning copies a batch's tensors to a CUDA device with non_blocking=True
(lightning.fabric.utilities.apply_func.move_data_to_device); the loaders pin their batches for
such a device, so that the copy is asynchronous and overlaps the training step.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from genreclf.data import DeviceFeatures, lengths_entry, loader
from genreclf.errors import GenreclfError
from genreclf.store import FeatureStore

log = logging.getLogger(__name__)

GPU_HEADROOM = 4 * 2**30  # bytes left free beside a gpu cache, for the model, its activations and the optimiser


def memory_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Return the bytes of memory available to a new process (Linux's MemAvailable), None where unknown."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(need: int, available: int | None, what: str, where: str, instead: str) -> None:
    """Raise GenreclfError unless `need` bytes fit in `available` (None: unknown, not refused)."""
    if available is not None and need > available:
        raise GenreclfError(
            f"--cache {what} needs {need / 1e9:.1f} GB {where} but {available / 1e9:.1f} GB is available; use {instead}"
        )


def refuse_together(error: GenreclfError | None, device: torch.device) -> None:
    """Raise `error` here, and a GenreclfError in every other process of the run, if any process has one.

    A refusal in one process alone (its GPU short of memory) would leave the others waiting for it at their
    next collective (under srun, for DDP's 30-minute timeout); so each process says whether it refuses, on
    `device` (NCCL's collectives take CUDA tensors), and all of them stop in one line if any does.
    """
    others = 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        refused = torch.tensor([error is not None], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(refused)
        others = int(refused.item()) - (error is not None)
    if error is not None:
        raise error
    if others:
        which = "another process" if others == 1 else f"{others} other processes"
        raise GenreclfError(f"{which} of this run refused its --cache (its error says why); nothing was trained")


def check_cache(store: FeatureStore, cache: str, device: torch.device, processes: int) -> None:
    """Raise GenreclfError if `cache` cannot be used for training on `device`, by `processes` on this machine.

    The gpu cache's free device memory is checked once the device is set up (in RunData.setup).
    """
    if cache == "gpu" and device.type != "cuda":
        why = "no CUDA GPU is available" if not torch.cuda.is_available() else f"this run trains on {device.type}"
        raise GenreclfError(
            f"--cache gpu holds the features on the training GPU, but {why}; use --cache ram or --cache none"
        )
    if cache == "ram":
        size = store.features_bytes
        where = "of memory" if processes == 1 else f"of memory ({processes} processes x {size / 1e9:.1f} GB)"
        check_fits(size * processes, memory_available(), "ram", where, "--cache none (the store memory-mapped)")


class RunData(L.LightningDataModule):
    """The training and validation batches of a run, drawn by its samplers, read as `cache` says.

    cache "none": crops read from the memory-mapped store, by `workers` processes; "ram": from a copy in
    this process's memory (forked workers share it); "gpu": the loaders yield index batches only, made in
    the training process (no workers: there is nothing left to do in parallel), and the crops are cut on
    the training device. Every cache gives the same batches.
    """

    def __init__(
        self,
        store: FeatureStore,
        train_sampler: Sampler,
        val_sampler: Sampler,
        workers: int = 0,
        cache: str = "none",
        pin_memory: bool = False,
    ):
        super().__init__()
        self.store, self.cache = store, cache
        self.device_features: DeviceFeatures | None = None
        workers, index_only = (0, True) if cache == "gpu" else (workers, False)
        self.loaders = tuple(
            loader(store, sampler, workers, pin_memory, index_only) for sampler in (train_sampler, val_sampler)
        )

    def setup(self, stage: str) -> None:
        """Build this process's cache, on the device the trainer chose for it."""
        device = self.trainer.strategy.root_device
        reports = self.trainer.is_global_zero
        t0 = time.perf_counter()
        if self.cache == "ram" and not self.store.in_memory:
            self.store.read_into_memory()
            if reports:
                log.info(
                    "--cache ram: %.2f GB of features read into memory in %.0f s",
                    self.store.features_bytes / 1e9,
                    time.perf_counter() - t0,
                )
        elif self.cache == "gpu" and self.device_features is None:
            need = len(self.store) * self.store.frame_shape[0] * self.store.frame_shape[1] * 2
            refusal = None
            if device.type == "cuda":
                free, total = torch.cuda.mem_get_info(device)
                # Memory this process's allocator holds but does not use (an earlier run's cache, in compare)
                # is free for it too.
                free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
                where = (
                    f"on {device} (with {GPU_HEADROOM / 2**30:.0f} GiB left for training; {total / 1e9:.1f} GB in all)"
                )
                try:
                    check_fits(need + GPU_HEADROOM, free, "gpu", where, "--cache ram or --cache none")
                except GenreclfError as e:
                    refusal = e
            refuse_together(refusal, device)  # a GPU short of memory stops every process, not only its own
            self.device_features = DeviceFeatures(self.store, device)
            if reports:
                log.info(
                    "--cache gpu: %.2f GB of features copied to %s in %.0f s",
                    self.device_features.nbytes / 1e9,
                    device,
                    time.perf_counter() - t0,
                )

    def train_dataloader(self) -> DataLoader:
        return self.loaders[0]

    def val_dataloader(self) -> DataLoader:
        return self.loaders[1]

    def transfer_batch_to_device(self, batch: dict[str, Tensor], device: torch.device, dataloader_idx: int) -> dict:
        """Move a batch to `device`; an index batch (cache "gpu") becomes a batch of crops cut there."""
        if "position" not in batch:
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        if self.device_features is None:
            raise RuntimeError("an index batch before RunData.setup built the device's features")
        x = self.device_features.crops(batch["position"], batch["start"], batch["lengths"])
        rest = {**lengths_entry(batch["lengths"]), "y": batch["y"], "counted": batch["counted"]}  # on the host
        return {"x": x, **super().transfer_batch_to_device(rest, device, dataloader_idx)}

    def teardown(self, stage: str) -> None:
        """Free the device's copy of the features once the fit is over (the ram copy stays with the store)."""
        self.device_features = None
