"""Crops and batches from a FeatureStore for training and evaluation.

All randomness (which tracks, crop length, crop start) is drawn in the main process by
`CropBatchSampler` from one seeded generator, so a run is reproducible whatever the number
of DataLoader workers. Workers only read memory-mapped rows: memory use does not grow
with the corpus.

A batch is read whole (`read_batch`): one fancy-indexed gather of float16 rows per store part,
converted to float32 once, where the per-item path (`CropDataset` + `collate`, kept as the
reference it is tested against) made one Python call and one copy per crop. `DeviceFeatures`
holds the whole store on a device and cuts the crops there, from the index batches that
`loader(..., index_only=True)` yields.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from genreclf.config import SPLITS
from genreclf.crops import crop_starts
from genreclf.errors import GenreclfError

if TYPE_CHECKING:  # annotations only: store imports pandas
    from genreclf.store import FeatureStore


def split_positions(store: FeatureStore, part: str, split: str = "official", seed: int = 0) -> np.ndarray:
    """Return the store positions of the tracks in `part` (training/validation/test) of `split`."""
    if split == "official":
        names = store.split
    elif split == "reference":
        from genreclf.metadata import reference_split  # pandas: not for the prediction path's imports

        names = reference_split(store.track_ids, seed=seed)
    else:
        raise GenreclfError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    positions = np.flatnonzero(names == part)
    if len(positions) == 0:
        raise GenreclfError(f"the {split} split of {store.path} has no {part} tracks; featurize a larger corpus")
    return positions


class CropDataset(Dataset):
    """Items are (position, start, length[, counted]) tuples; returns float32 crops, targets and counted.

    The per-item path, batched by `collate`: the reference that `read_batch` is tested against.

    `counted` is 0 for a duplicate that pads a DDP rank's share of the validation set (its loss is left
    out) and 1 otherwise, the default.
    """

    def __init__(self, store: FeatureStore):
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, item: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, int]:
        position, start, length, *counted = item
        crop = np.asarray(self.store.item(position)[start : start + length], dtype=np.float32)
        return crop, self.store.targets[position], counted[0] if counted else 1


def lengths_entry(lengths: Tensor) -> dict[str, Tensor]:
    """Return a batch's {"lengths": lengths} entry, or none where every crop is as long as the longest.

    A batch of whole crops (training's, mostly) leaves its lengths out, as the models take them: with
    lengths on a GPU, finding that no frame is padding would wait for the device every step.
    """
    return {} if bool((lengths == lengths.max()).all()) else {"lengths": lengths}


def collate(items: list[tuple]) -> dict[str, torch.Tensor]:
    """Stack crops into a zero-padded batch with their real lengths (`lengths_entry`), float targets and
    "counted" flags."""
    lengths = [len(item[0]) for item in items]
    x = np.zeros((len(items), max(lengths), items[0][0].shape[1]), np.float32)
    for i, item in enumerate(items):
        x[i, : len(item[0])] = item[0]
    y = np.stack([item[1] for item in items]).astype(np.float32)
    counted = torch.tensor([bool(item[2]) if len(item) > 2 else True for item in items])
    return {
        "x": torch.from_numpy(x),
        **lengths_entry(torch.tensor(lengths)),
        "y": torch.from_numpy(y),
        "counted": counted,
    }


class CropBatchSampler(Sampler):
    """Shuffled batches of random crops; one crop length per batch, drawn from [min_frames, max_frames].

    Short clips give shorter crops (their real frames only); the model masks the padding.
    Iteration i draws epoch first_epoch + i, from default_rng([seed, epoch]): a run resumed at
    epoch e (first_epoch=e) draws the crops the uninterrupted run drew.

    `batch_size` is the global batch: under DDP every rank draws the batches one process draws and
    takes members rank::world_size of each (batch_size / world_size of them), so the ranks' mean
    gradients, which DDP averages, are the gradient of the global batch's mean loss.
    """

    def __init__(
        self,
        valid_frames: np.ndarray,
        positions: np.ndarray,
        batch_size: int,
        min_frames: int,
        max_frames: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        first_epoch: int = 0,
    ):
        if not 1 <= min_frames <= max_frames:
            raise GenreclfError(f"crop lengths must satisfy 1 <= min <= max, got {min_frames}..{max_frames}")
        _check_share(batch_size, rank, world_size)
        self.valid_frames = np.asarray(valid_frames)
        self.positions = np.asarray(positions)
        self.batch_size, self.min_frames, self.max_frames = batch_size, min_frames, max_frames
        self.seed, self.epoch = seed, first_epoch  # the epoch the next iteration draws
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return -(-_padded_length(len(self.positions), self.world_size) // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        # The sampler counts epochs itself, as DataLoader workers prefetch an epoch's first batches
        # before the trainer's epoch hooks run. No set_epoch: trainers call it at times of their choosing.
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        order = rng.permutation(self.positions)
        # Under DDP the epoch is padded (wrapping) to a multiple of world_size, so that every rank gets as
        # many batches and none is empty; the duplicates are drawn last, after all the one-process draws.
        order = np.resize(order, _padded_length(len(order), self.world_size))
        mine = slice(self.rank, None, self.world_size)
        for b in range(0, len(order), self.batch_size):
            batch = order[b : b + self.batch_size]
            length = int(rng.integers(self.min_frames, self.max_frames + 1))
            valid = self.valid_frames[batch]
            starts = (rng.random(len(batch)) * (np.maximum(valid - length, 0) + 1)).astype(np.int64)
            yield [(int(p), int(s), int(min(length, v))) for p, s, v in zip(batch[mine], starts[mine], valid[mine])]


def _check_share(batch_size: int, rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    if batch_size < 1 or batch_size % world_size:
        raise GenreclfError(
            f"batch size {batch_size} is the global batch and must be a multiple of the {world_size} training "
            f"processes (devices x nodes); use e.g. --batch-size {max(1, batch_size // world_size) * world_size}"
        )


def _padded_length(n: int, world_size: int) -> int:
    """Return n rounded up to a multiple of world_size: the length of an epoch's order under DDP."""
    return -(-n // world_size) * world_size


class EvenCropSampler(Sampler):
    """Deterministic batches of one crop each, for validation: the centre `length` frames of each track.

    Under DDP rank r takes members r::world_size of each batch of `batch_size` tracks; the tracks are
    padded (wrapping) to a multiple of world_size, and the duplicates come with counted=0, so that a
    loss over every rank's counted clips is the loss over the validation set, each clip once.
    """

    def __init__(
        self,
        valid_frames: np.ndarray,
        positions: np.ndarray,
        batch_size: int,
        length: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        _check_share(batch_size, rank, world_size)
        self.valid_frames, self.positions = np.asarray(valid_frames), np.asarray(positions)
        self.batch_size, self.length = batch_size, length
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return -(-_padded_length(len(self.positions), self.world_size) // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        n = len(self.positions)
        padded = np.resize(self.positions, _padded_length(n, self.world_size))
        for b in range(0, len(padded), self.batch_size):
            index = np.arange(b, min(b + self.batch_size, len(padded)))[self.rank :: self.world_size]
            batch = []
            for i, p in zip(index, padded[index]):
                v = int(self.valid_frames[p])
                item = (int(p), crop_starts(v, self.length, 1)[0], min(self.length, v))
                batch.append(item if i < n else (*item, 0))
            yield batch


def _columns(items: list[tuple[int, ...]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return the positions, starts, lengths (int64) and counted flags (bool) of a batch's items."""
    positions, starts, lengths = (np.fromiter((item[k] for item in items), np.int64, len(items)) for k in range(3))
    counted = np.fromiter((len(item) < 4 or bool(item[3]) for item in items), bool, len(items))
    return positions, starts, lengths, counted


def crop_frames(starts: Tensor, lengths: Tensor, longest: int) -> tuple[Tensor, Tensor]:
    """Return the (B, longest) frame indices of crops and the (B, longest) mask of their real frames.

    Beyond its length a crop's index repeats its last frame (always inside the track); the mask zeroes it.
    `longest` is max(lengths), passed in as a number: on a GPU, reading it from `lengths` waits for the device.
    """
    steps = torch.arange(longest, device=starts.device)
    real = steps < lengths[:, None]
    return starts[:, None] + torch.minimum(steps, lengths[:, None] - 1), real


def read_batch(store: FeatureStore, items: list[tuple[int, ...]], index_only: bool = False) -> dict[str, Tensor]:
    """Return one batch of (position, start, length[, counted]) items, as `collate` of the per-item path does.

    {"x": float32 (B, L, mels) zero-padded, "lengths": int64 (left out where every crop is whole:
    `lengths_entry`), "y": float32 targets, "counted": bool}; with `index_only`, no "x" but "position",
    "start" and "lengths" (int64), for `DeviceFeatures.crops` to cut on its device.
    """
    positions, starts, lengths, counted = _columns(items)
    batch = {
        "lengths": torch.from_numpy(lengths),
        "y": torch.from_numpy(store.targets[positions].astype(np.float32)),
        "counted": torch.from_numpy(counted),
    }
    if index_only:
        return {"position": torch.from_numpy(positions), "start": torch.from_numpy(starts), **batch}
    longest = int(lengths.max())
    frames, _ = crop_frames(torch.from_numpy(starts), batch.pop("lengths"), longest)
    crops = torch.from_numpy(store.gather(positions, frames.numpy()))
    # Converted crop by crop: torch's float16 -> float32 is ~10x numpy's astype (0.07 vs 1.3 ms a batch of
    # 32 x 256 frames), and a crop of up to 256 frames is within torch's grain for one thread (32,768
    # elements). Batch-wide, the copy goes to the intra-op threads, and on a loaded 2-core machine waiting
    # for a descheduled one took up to 7 ms a batch (measured: p95 4.5 ms, against 0.2 ms crop by crop).
    x = torch.empty((len(items), longest, crops.shape[2]), dtype=torch.float32)
    for row, crop, length in zip(x, crops, lengths.tolist()):
        row[:length].copy_(crop[:length])
        if length < longest:
            row[length:].zero_()
    return {"x": x, **lengths_entry(torch.from_numpy(lengths)), **batch}


class CropBatches(Dataset):
    """Items are whole batches, lists of (position, start, length[, counted]); returns `read_batch`'s dict."""

    def __init__(self, store: FeatureStore, index_only: bool = False):
        self.store, self.index_only = store, index_only

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, items: list[tuple[int, ...]]) -> dict[str, Tensor]:
        return read_batch(self.store, items, self.index_only)


class DeviceFeatures:
    """A store's float16 features held on one device, in position order; crops are cut there by one gather.

    The host sends only the batch's index tensors (`read_batch(..., index_only=True)`), never features.
    """

    CHUNK = 1024  # tracks copied at a time while loading (240 MB of float16)

    def __init__(self, store: FeatureStore, device: torch.device | str):
        self.device = torch.device(device)
        n, (self.frames, mels) = len(store), store.frame_shape
        # Flat (tracks x frames, mels): a crop's frames are rows of it, gathered by index_select.
        self.features = torch.empty((n * self.frames, mels), dtype=torch.float16, device=self.device)
        tracks = self.features.view(n, self.frames, mels)
        every_frame = np.arange(self.frames)[None, :]
        for a in range(0, n, self.CHUNK):
            positions = np.arange(a, min(a + self.CHUNK, n))
            chunk = store.gather(positions, np.broadcast_to(every_frame, (len(positions), self.frames)))
            tracks[a : a + len(positions)].copy_(torch.from_numpy(chunk))

    @property
    def nbytes(self) -> int:
        """Return the bytes the features take on the device."""
        return self.features.nbytes

    def crops(self, positions: Tensor, starts: Tensor, lengths: Tensor) -> Tensor:
        """Return float32 (B, max length, mels) crops on the device, zero beyond each crop's length.

        positions, starts and lengths are int64 (B,) tensors on the host (pinned: copied asynchronously).
        """
        longest = int(lengths.max())
        positions, starts, lengths = (t.to(self.device, non_blocking=True) for t in (positions, starts, lengths))
        frames, real = crop_frames(starts, lengths, longest)
        x = self.features.index_select(0, (positions[:, None] * self.frames + frames).flatten())
        return x.view(*frames.shape, -1).float().masked_fill_(~real[..., None], 0.0)


def loader(
    store: FeatureStore, sampler: Sampler, workers: int = 0, pin_memory: bool = False, index_only: bool = False
) -> DataLoader:
    """Return a DataLoader over `store` whose batches, drawn by `sampler`, are each read whole (`read_batch`).

    `pin_memory` for a CUDA device: Lightning's copy to it is then asynchronous (non_blocking).
    """
    return DataLoader(
        CropBatches(store, index_only),
        sampler=sampler,  # yields whole batches, read by one __getitem__ each
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
    )
