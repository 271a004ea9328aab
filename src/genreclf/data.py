"""Crops and batches from a FeatureStore for training and evaluation.

All randomness (which tracks, crop length, crop start) is drawn in the main process by
`CropBatchSampler` from one seeded generator, so a run is reproducible whatever the number
of DataLoader workers. Workers only read memory-mapped rows: memory use does not grow
with the corpus.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from genreclf.config import SPLITS
from genreclf.errors import GenreclfError

if TYPE_CHECKING:  # annotations only: the prediction path imports crop_starts without pandas
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


def crop_starts(n_frames: int, crop: int, n_crops: int) -> list[int]:
    """Return evenly spaced start frames of n_crops crops of length crop covering n_frames.

    The first crop starts at 0 and the last at n_frames - crop; one crop is the
    centre crop; a sequence no longer than crop gives [0] (the caller pads).
    Starts are rounded half up and deduplicated, so a short sequence can give
    fewer than n_crops crops (a repeated crop would count twice in an average).
    """
    if crop < 1 or n_crops < 1:
        raise GenreclfError(f"crop length and number of crops must be >= 1, got {crop} and {n_crops}")
    span = n_frames - crop
    if span <= 0:
        return [0]
    if n_crops == 1:
        return [span // 2]
    starts = [(2 * k * span + n_crops - 1) // (2 * (n_crops - 1)) for k in range(n_crops)]
    return sorted(set(starts))


class CropDataset(Dataset):
    """Items are (position, start, length) triples; returns float32 crops with their targets."""

    def __init__(self, store: FeatureStore):
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, item: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        position, start, length = item
        crop = np.asarray(self.store.item(position)[start : start + length], dtype=np.float32)
        return crop, self.store.targets[position]


def collate(items: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack crops into a zero-padded batch with their real lengths and float targets."""
    lengths = [len(x) for x, _ in items]
    x = np.zeros((len(items), max(lengths), items[0][0].shape[1]), np.float32)
    for i, (crop, _) in enumerate(items):
        x[i, : len(crop)] = crop
    y = np.stack([t for _, t in items]).astype(np.float32)
    return {"x": torch.from_numpy(x), "lengths": torch.tensor(lengths), "y": torch.from_numpy(y)}


class CropBatchSampler(Sampler):
    """Shuffled batches of random crops; one crop length per batch, drawn from [min_frames, max_frames].

    Short clips give shorter crops (their real frames only); the model masks the padding.
    Iteration i draws epoch first_epoch + i, from default_rng([seed, epoch]): a run resumed at
    epoch e (first_epoch=e) draws the crops the uninterrupted run drew.
    """

    def __init__(
        self,
        valid_frames: np.ndarray,
        positions: np.ndarray,
        batch_size: int,
        min_frames: int,
        max_frames: int,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        first_epoch: int = 0,
    ):
        if not 1 <= min_frames <= max_frames:
            raise GenreclfError(f"crop lengths must satisfy 1 <= min <= max, got {min_frames}..{max_frames}")
        self.valid_frames = np.asarray(valid_frames)
        self.positions = np.asarray(positions)
        self.batch_size, self.min_frames, self.max_frames = batch_size, min_frames, max_frames
        self.seed, self.epoch = seed, first_epoch  # the epoch the next iteration draws
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        _, world = _rank_and_world(self.rank, self.world_size)
        per_rank = -(-len(self.positions) // world)  # ceil: every rank gets as many tracks
        return -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        # The sampler counts epochs itself, as DataLoader workers prefetch an epoch's first batches
        # before the trainer's epoch hooks run. No set_epoch: trainers call it at times of their choosing.
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        order = _this_rank(rng.permutation(self.positions), self.rank, self.world_size)
        for b in range(0, len(order), self.batch_size):
            batch = order[b : b + self.batch_size]
            length = int(rng.integers(self.min_frames, self.max_frames + 1))
            valid = self.valid_frames[batch]
            starts = (rng.random(len(batch)) * (np.maximum(valid - length, 0) + 1)).astype(np.int64)
            yield [(int(p), int(s), int(min(length, v))) for p, s, v in zip(batch, starts, valid)]


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _this_rank(order: np.ndarray, rank: int | None, world_size: int | None) -> np.ndarray:
    """Return this DDP rank's share of `order`: disjoint, equal-sized (wrapping), as DDP needs."""
    rank, world = _rank_and_world(rank, world_size)
    if world == 1:
        return order
    per_rank = -(-len(order) // world)
    padded = np.resize(order, per_rank * world)  # repeats the first few so every rank has as many
    return padded[rank::world]


class EvenCropSampler(Sampler):
    """Deterministic batches of one crop each, for validation: the centre `length` frames of each track."""

    def __init__(self, valid_frames: np.ndarray, positions: np.ndarray, batch_size: int, length: int):
        self.valid_frames, self.positions = np.asarray(valid_frames), np.asarray(positions)
        self.batch_size, self.length = batch_size, length

    def __len__(self) -> int:
        return -(-len(self.positions) // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for b in range(0, len(self.positions), self.batch_size):
            batch = self.positions[b : b + self.batch_size]
            valid = self.valid_frames[batch]
            starts = [crop_starts(int(v), self.length, 1)[0] for v in valid]
            yield [(int(p), int(s), int(min(self.length, v))) for p, s, v in zip(batch, starts, valid)]


def loader(store: FeatureStore, sampler: Sampler, workers: int = 0) -> DataLoader:
    """Return a DataLoader over `store` whose batches are drawn by `sampler`."""
    return DataLoader(
        CropDataset(store),
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
