"""End-to-end training benchmark: `genreclf train` against the reference's Keras `fit`, on the same store.

    python benchmarks/train_fit.py [--tracks 1400] [--epochs 4] [--rounds 2] [--models gru transformer]
                                   [--ours default ddp] [--dir DIR]

Needs the [bench] extra (tensorflow-cpu, tf-keras). Writes a store of random float16 features
(benchmarks/scale.py's writer: 938 frames per track, splits 80/10/10), then, taking turns, for each model:
  - ours: the real command, `genreclf train --model M --store S --out RUN --epochs E --accelerator cpu`,
    with its loader (memory-mapped store, DataLoader), validation, checkpoints and plateau schedule
    ("default": one process; "ddp": `--devices 2 --strategy ddp`, two single-threaded processes
    sharing each global batch of 32);
  - Keras: the reference's model (benchmarks/reference_keras.py) and its recipe, `model.fit` on a
    keras.utils.Sequence that serves the same crops (genreclf's CropBatchSampler: batch 32, one random
    128-256-frame length per batch) from the features copied into RAM as float32, validated on the same
    validation tracks' centre 256 frames, with ModelCheckpoint(save_best_only) and ReduceLROnPlateau.
Samples/s = training tracks / seconds of an epoch (its training steps, validation and checkpoint), the
fastest epoch after the first (which traces and warms caches), best over --rounds. Also printed: the
whole command's wall time and peak memory (maximum resident set of the process and its children).
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import describe_machine
from scale import write_store

BATCH, MIN_CROP, MAX_CROP, VAL_CROP = 32, 128, 256, 256
TARGET = 1.2
OURS = {"default": [], "ddp": ["--devices", "2", "--strategy", "ddp"]}


def _run(command: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run command; return (wall seconds, peak resident MB of it and its children), failing with its output."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        if proc.returncode:
            log.seek(0)
            raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{log.read()[-3000:]}")
    return wall, usage.ru_maxrss / 1024  # ru_maxrss: KB; the largest of the process and its waited children


def ours(kind: str, variant: str, store: Path, out: Path, epochs: int, workers: int | None) -> dict:
    """Train with the genreclf command; return its epoch seconds, wall time and peak memory."""
    command = [sys.executable, "-m", "genreclf", "train", "--model", kind, "--store", str(store)]
    command += ["--out", str(out), "--epochs", str(epochs), "--accelerator", "cpu", "--quiet", *OURS[variant]]
    command += [] if workers is None else ["--workers", str(workers)]
    wall, peak = _run(command)
    with open(out / "logs" / "metrics.csv", newline="") as f:
        seconds = [float(row["epoch_seconds"]) for row in csv.DictReader(f)]
    return {"epochs": seconds, "wall": wall, "peak_mb": peak}


def _keras_fit(kind: str, store_path: str, epochs: int, seed: int, threads: int, out: str, conn) -> None:
    """In its own process: the reference's model and fit on the store's crops; send epoch seconds and more."""
    import resource
    import warnings

    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # no CUDA-not-found lines on a CPU machine
    warnings.filterwarnings("ignore", ".*HDF5 file.*")  # the reference saved .h5 files
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    t_start = time.perf_counter()
    import reference_keras as rk  # TensorFlow in this process only

    from genreclf.data import CropBatchSampler, EvenCropSampler, split_positions
    from genreclf.store import FeatureStore

    rk.set_threads(threads)
    keras = rk.keras
    store = FeatureStore.open(store_path)
    train_pos = split_positions(store, "training", "official", seed)
    val_pos = split_positions(store, "validation", "official", seed)
    # The reference read .npy files per track; here every feature is in RAM already (float32, as it trained).
    rows = np.concatenate([train_pos, val_pos])
    ram = {int(p): np.asarray(store.item(int(p)), np.float32) for p in rows}
    targets = store.targets.astype(np.float32)

    class Crops(keras.utils.Sequence):
        def __init__(self, sampler):
            super().__init__()
            self.sampler, self.batches = sampler, list(sampler)

        def __len__(self) -> int:
            return len(self.batches)

        def __getitem__(self, i: int):
            items = self.batches[i]
            x = np.stack([ram[p][s : s + n] for p, s, n, *_ in items])
            return x, targets[[p for p, *_ in items]]

        def on_epoch_end(self) -> None:
            if isinstance(self.sampler, CropBatchSampler):  # the next epoch's draw, as genreclf's
                self.batches = list(self.sampler)

    train = Crops(CropBatchSampler(store.valid_frames, train_pos, BATCH, MIN_CROP, MAX_CROP, seed))
    val = Crops(EvenCropSampler(store.valid_frames, val_pos, BATCH, VAL_CROP))
    model = rk.build(kind)

    class EpochTimes(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):  # after validation; before the other callbacks' epoch end
            self.seconds.append(time.perf_counter() - self.t0)

    times = EpochTimes()
    callbacks = [
        keras.callbacks.ModelCheckpoint(str(Path(out) / "best.h5"), monitor="val_loss", save_best_only=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", patience=20, min_lr=1e-7),
        times,  # last: its epoch end comes after the checkpoint's
    ]
    model.fit(train, validation_data=val, epochs=epochs, callbacks=callbacks, verbose=0, shuffle=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    conn.send({"epochs": times.seconds, "wall": time.perf_counter() - t_start, "peak_mb": peak})


def keras_fit(kind: str, store: Path, out: Path, epochs: int, seed: int, threads: int) -> dict:
    """Run _keras_fit in a fresh process (TensorFlow and PyTorch each bring their own oneDNN and threads)."""
    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_keras_fit, args=(kind, str(store), epochs, seed, threads, str(out), child))
    proc.start()
    child.close()
    try:
        result = parent.recv()
    except EOFError:
        raise SystemExit(f"the Keras fit of {kind} failed (exit code {proc.join() or proc.exitcode})") from None
    proc.join()
    return result


def samples_per_second(result: dict, train_tracks: int) -> float:
    """Training tracks over the fastest epoch after the first."""
    later = result["epochs"][1:] or result["epochs"]
    return train_tracks / min(later)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracks", type=int, default=1400, help="tracks in the store (80%% training, 10%% validation)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs per fit (the first is not counted)")
    ap.add_argument("--rounds", type=int, default=2, help="fits per implementation, taking turns; the best counts")
    ap.add_argument("--models", nargs="+", default=["gru", "transformer"], choices=["gru", "transformer"])
    ap.add_argument("--ours", nargs="+", default=["default", "ddp"], choices=list(OURS), help="our launches to time")
    ap.add_argument("--workers", type=int, help="genreclf train --workers (default: its own)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="TensorFlow's intra- and inter-op threads")
    ap.add_argument("--dir", type=Path, help="work folder (default: a temporary one); its store is reused")
    args = ap.parse_args()
    if args.epochs < 2:
        ap.error("--epochs must be at least 2: the first epoch is not counted")

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = args.dir or Path(tmp)
        store = root / f"store_{args.tracks}"
        write_store(store, args.tracks)
        from genreclf.data import split_positions
        from genreclf.store import FeatureStore

        n_train = len(split_positions(FeatureStore.open(store), "training"))
        print(describe_machine(), flush=True)
        print(f"{n_train} training tracks, batch {BATCH}, crops {MIN_CROP}-{MAX_CROP}, {args.epochs} epochs")
        results: dict[tuple[str, str], list[dict]] = {}
        for kind in args.models:
            for r in range(args.rounds):
                for variant in args.ours:
                    run = root / f"run_{kind}_{variant}_{r}_{time.time_ns()}"
                    results.setdefault((kind, variant), []).append(
                        ours(kind, variant, store, run, args.epochs, args.workers)
                    )
                keras_out = root / f"keras_{kind}_{r}_{time.time_ns()}"
                results.setdefault((kind, "keras"), []).append(
                    keras_fit(kind, store, keras_out, args.epochs, 0, args.threads)
                )
                print(
                    f"  {kind} round {r + 1}: "
                    + ", ".join(
                        f"{v} {samples_per_second(rs[-1], n_train):.1f}/s"
                        for (k, v), rs in results.items()
                        if k == kind
                    ),
                    flush=True,
                )
    print(
        f"\n  {'model':<12} {'genreclf':<8} {'ours/s':>8} {'Keras/s':>8} {'ours/Keras':>10}"
        f" {'ours wall':>9} {'Keras wall':>10} {'ours peak':>9} {'Keras peak':>10}"
    )
    for kind in args.models:
        keras_runs = results[(kind, "keras")]
        k = max(samples_per_second(r, n_train) for r in keras_runs)
        for variant in args.ours:
            runs = results[(kind, variant)]
            o = max(samples_per_second(r, n_train) for r in runs)
            mark = "" if o / k >= TARGET else f"   (< {TARGET})"
            print(
                f"  {kind:<12} {variant:<8} {o:8.1f} {k:8.1f} {o / k:9.2f}x"
                f" {min(r['wall'] for r in runs):8.1f}s {min(r['wall'] for r in keras_runs):9.1f}s"
                f" {max(r['peak_mb'] for r in runs):7.0f}MB {max(r['peak_mb'] for r in keras_runs):8.0f}MB{mark}"
            )


if __name__ == "__main__":
    main()
