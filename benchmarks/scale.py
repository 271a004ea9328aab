"""Scale benchmark: a store of fma_large's size without FMA; its loader, evaluation, memory, and the epoch time.

    python benchmarks/scale.py [--tracks 106574] [--dir DIR] [--eval-tracks 10000] [--keep] [--loader-only]

Writes a feature store of N tracks straight from random arrays (no audio; float16 features of
938 x 128 per track, 25.6 GB for N = 106,574, through genreclf's own PartWriter; splits 80/10/10,
1-3 genres per track), then measures, in this process:
  - FeatureStore.open time;
  - the training loader alone over one epoch of the training split (CropBatchSampler: batch 32,
    random 128-256-frame crops, as `genreclf train` draws them), 0 and 1 DataLoader workers, for
    the per-item path (one CropDataset call per crop, then collate: genreclf before batches were
    read whole) and for `genreclf.data.loader` (each batch read whole by one gather per part);
    then the same from the store read into memory (`--cache ram`) when it fits;
  - one training step per model on those batches (samples/s, batch 32, the training path of
    `genreclf train` without Lightning's bookkeeping), and from it the projected epoch time;
  - evaluation (8 crops of 256 frames per track, as `genreclf evaluate`) over --eval-tracks tracks;
  - memory: private memory (RssAnon) sampled every 0.2 s, and the file pages mapped (RssFile,
    page cache: shared and reclaimable), after each stage. Nothing private may grow with N.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from common import describe_machine
from torch.utils.data import DataLoader

from genreclf.audio import N_FRAMES, N_MELS
from genreclf.data import CropBatchSampler, CropDataset, collate, loader, split_positions
from genreclf.datamodule import memory_available
from genreclf.evaluate import predict_store
from genreclf.losses import weighted_bce
from genreclf.metadata import load_genres
from genreclf.models import GRUConfig, TransformerConfig, model_from_config
from genreclf.store import FeatureStore, PartWriter, StoreHeader, part_name

FMA_LARGE = 106_574
TRAIN_STEPS = 12  # timed training steps per model (after 3 warm-up steps)


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class Memory:
    """The peak of this process's private memory (RssAnon), sampled in a thread."""

    def __init__(self):
        self.peak_kb, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak_kb = max(self.peak_kb, _status_kb("RssAnon"))

    def report(self, stage: str) -> str:
        self.peak_kb = max(self.peak_kb, _status_kb("RssAnon"))
        return (
            f"  memory after {stage:<22} private {_status_kb('RssAnon') / 1024:7.0f} MB "
            f"(peak so far {self.peak_kb / 1024:.0f} MB), file pages mapped {_status_kb('RssFile') / 1024:7.0f} MB"
        )


def write_store(path: Path, n: int, seed: int = 0) -> None:
    """Write a complete one-part store of n tracks of random features (reused if already there)."""
    if (path / "store.json").exists() and len(FeatureStore.open(path)) == n:
        print(f"store: reusing {path} ({n:,} tracks)")
        return
    shutil.rmtree(path, ignore_errors=True)
    rng = np.random.default_rng(seed)
    genres = load_genres()
    splits = rng.choice(["training", "validation", "test"], size=n, p=[0.8, 0.1, 0.1])
    plan = pd.DataFrame(
        {
            "track_id": np.arange(1, n + 1),
            "split": splits,
            "artist_id": rng.integers(1, max(2, n // 6), n),
            "genre_top": "",
            "path": [f"synthetic/{i:06d}.mp3" for i in range(1, n + 1)],
        }
    )
    targets = np.zeros((n, len(genres)), np.uint8)
    for row in range(n):
        targets[row, rng.choice(len(genres), size=rng.integers(1, 4), replace=False)] = 1
    header = StoreHeader.of_genres(genres, n_parts=1, source="benchmarks/scale.py (random features)")
    path.mkdir(parents=True)
    (path / "store.json").write_text(header.to_json())
    t0 = time.perf_counter()
    writer = PartWriter(path / part_name(0, 1), plan, targets, N_FRAMES, N_MELS)
    blocks = rng.standard_normal((64, N_FRAMES, N_MELS)).astype(np.float16)  # cycled: content is not measured
    for row in range(n):
        writer.write(row, blocks[row % len(blocks)], N_FRAMES)
        if row % 5000 == 4999:
            writer.flush()
            rate = (row + 1) / (time.perf_counter() - t0)
            print(f"  store: {row + 1:,}/{n:,} tracks written, {rate:.0f}/s", end="\r", flush=True)
    writer.finish()
    size = (path / part_name(0, 1) / "features.npy").stat().st_size
    print(f"store: {n:,} tracks, {size / 1e9:.1f} GB written in {time.perf_counter() - t0:.0f} s" + " " * 20)


def per_item_loader(store: FeatureStore, sampler: CropBatchSampler, workers: int) -> DataLoader:
    """The loader before batches were read whole: one CropDataset call per crop, collate copying each in."""
    return DataLoader(
        CropDataset(store),
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


def loader_epoch(
    store: FeatureStore, positions: np.ndarray, workers: int, limit: int | None, per_item: bool = False
) -> tuple[int, float]:
    """Return (crops, seconds) for one epoch of training batches (at most `limit` batches)."""
    sampler = CropBatchSampler(store.valid_frames, positions, 32, 128, 256, seed=0)
    batches = per_item_loader(store, sampler, workers) if per_item else loader(store, sampler, workers)
    crops, t0 = 0, time.perf_counter()
    for b, batch in enumerate(batches):
        crops += len(batch["x"])
        if limit is not None and b + 1 >= limit:
            break
    return crops, time.perf_counter() - t0


def train_rate(store: FeatureStore, positions: np.ndarray, kind: str) -> float:
    """Training samples/s of one model on batches from the store (batch 32, crops 128-256)."""
    torch.manual_seed(0)
    model = model_from_config(GRUConfig() if kind == "gru" else TransformerConfig()).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-5, eps=1e-7)
    batches = loader(store, CropBatchSampler(store.valid_frames, positions, 32, 128, 256, seed=1))
    t0, n = 0.0, 0
    for i, batch in enumerate(batches):
        if i == 3:
            t0, n = time.perf_counter(), 0
        opt.zero_grad()
        weighted_bce(model(batch["x"], batch.get("lengths")), batch["y"], 4.0).backward()
        opt.step()
        n += len(batch["x"])
        if i == 3 + TRAIN_STEPS - 1:
            break
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracks", type=int, default=FMA_LARGE, help="tracks in the store")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the store (default: a temp folder)")
    parser.add_argument("--eval-tracks", type=int, default=10_000, help="tracks to evaluate per model")
    parser.add_argument("--loader-batches", type=int, default=None, help="stop the loader epoch after this many")
    parser.add_argument("--keep", action="store_true", help="keep the store (default: delete it at the end)")
    parser.add_argument("--loader-only", action="store_true", help="stop after the loader: no training, no evaluation")
    parser.add_argument("--rounds", type=int, default=1, help="loader epochs per path, taking turns (the best counts)")
    args = parser.parse_args()
    print(f"machine: {describe_machine()}")
    root = args.dir or Path(tempfile.mkdtemp(prefix="genreclf-bench-scale-"))
    path = root / "scale.store"
    memory = Memory()
    try:
        write_store(path, args.tracks)
        print(memory.report("writing the store"))
        t0 = time.perf_counter()
        store = FeatureStore.open(path)
        print(f"FeatureStore.open: {time.perf_counter() - t0:.2f} s for {len(store):,} tracks")
        print(memory.report("opening it"))
        train_pos = split_positions(store, "training")
        val_pos = split_positions(store, "validation")
        test_pos = split_positions(store, "test")
        print(f"splits: {len(train_pos):,} training, {len(val_pos):,} validation, {len(test_pos):,} test")
        loads: dict[tuple[bool, int], float] = {}
        for turn in range(args.rounds):  # taking turns: on a shared machine, the best of each
            for per_item, name in ((True, "per item"), (False, "batch read whole")):
                for workers in (0, 1):
                    crops, seconds = loader_epoch(store, train_pos, workers, args.loader_batches, per_item)
                    loads[per_item, workers] = max(loads.get((per_item, workers), 0.0), crops / seconds)
                    print(
                        f"loader, {name}, {workers} workers: {crops:,} crops in {seconds:.1f} s = "
                        f"{crops / seconds:,.0f} crops/s" + (f" (round {turn + 1})" if args.rounds > 1 else "")
                    )
                    print(memory.report(f"a loader epoch ({workers} w)"))
        for workers in (0, 1):
            old, new = loads[True, workers], loads[False, workers]
            print(f"{workers} workers: batch read whole {new:,.0f} crops/s, per item {old:,.0f} ({new / old:.1f}x)")
        available = memory_available()
        if available is not None and store.features_bytes > 0.8 * available:
            print(
                f"loader, store in memory: skipped, its {store.features_bytes / 1e9:.1f} GB would not fit in 80% "
                f"of the {available / 1e9:.1f} GB available (genreclf train --cache ram would refuse beyond 100%)"
            )
        else:
            held, t0 = FeatureStore.open(path), time.perf_counter()  # a store of its own, let go after
            held.read_into_memory()
            seconds = time.perf_counter() - t0
            print(f"store read into memory (--cache ram): {held.features_bytes / 1e9:.1f} GB in {seconds:.1f} s")
            rate = 0.0
            for _ in range(args.rounds):
                crops, seconds = loader_epoch(held, train_pos, 0, args.loader_batches)
                rate = max(rate, crops / seconds)
            print(f"loader, store in memory, 0 workers: {rate:,.0f} crops/s (best of {args.rounds})")
            print(memory.report("a loader epoch in memory"))
            del held
        if args.loader_only:
            return
        rates = {kind: train_rate(store, train_pos, kind) for kind in ("gru", "transformer")}
        print(memory.report("training steps"))
        for kind in ("gru", "transformer"):
            model = model_from_config(GRUConfig() if kind == "gru" else TransformerConfig()).eval()
            positions = test_pos[: args.eval_tracks]
            t0 = time.perf_counter()
            predict_store(model, store, positions)
            per = (time.perf_counter() - t0) / len(positions)
            epoch = len(train_pos) / rates[kind] + len(val_pos) * per / 8  # validation: one crop per track
            print(
                f"{kind:<11} training {rates[kind]:6.1f} samples/s "
                f"(loader: {loads[False, 1] / rates[kind]:.0f}x that); "
                f"evaluation {len(positions):,} tracks in {per * len(positions):.0f} s ({1 / per:.1f} tracks/s); "
                f"projected epoch on this machine: {epoch / 3600:.2f} h"
            )
        print(memory.report("evaluation"))
    finally:
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
