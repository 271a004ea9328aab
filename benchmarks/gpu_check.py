"""GPU check of the training data path: `genreclf train` on one GPU with each --cache and --precision.

    python benchmarks/gpu_check.py [--tracks 20000] [--dir DIR] [--models gru transformer] [--budget 270]

Needs a CUDA GPU and nvidia-smi; meant to finish in under 5 minutes on one H200. It:
  1. writes a synthetic store of --tracks tracks (benchmarks/scale.py's write_store: random float16
     features, fma_large's format; 20,000 tracks = 4.8 GB);
  2. checks that crops cut on the GPU (DeviceFeatures, --cache gpu) equal the memory-mapped path's,
     exactly, on training and validation batches;
  3. runs genreclf.train.train, what `genreclf train` runs, for one epoch (batch 32, crops 128-256) with
     --accelerator gpu, for each model, each --precision (bf16-mixed, 32) and each data path: --cache none
     with 1 worker (the default) and 0, --cache ram (0 workers), --cache gpu; while a thread calls
     nvidia-smi for the GPU's utilisation and power every ~100 ms;
  4. prints a table: training samples/s, mean GPU utilisation (nvidia-smi's: the share of time a kernel
     ran) and power, from batch WARMUP to the end of the epoch's training batches (validation and the
     decision thresholds are not timed); the epoch's train_loss (runs of the same model and precision
     should agree closely, not to the bit: cuDNN and atomics), and the peak GPU memory allocated.
Every failure is loud: a missing GPU or nvidia-smi stops it at once; a run that raises prints its traceback,
the rest go on, and the exit status is 1. Runs not started within --budget seconds are listed as skipped
(exit status 3).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from scale import write_store

from genreclf.config import FitConfig, TrainConfig
from genreclf.data import CropBatchSampler, DeviceFeatures, EvenCropSampler, read_batch, split_positions
from genreclf.store import FeatureStore
from genreclf.train import train

WARMUP = 50  # training batches left out of the timing: cuDNN's and the allocator's first steps
PATHS = (  # (cache, workers), in the order they run
    ("gpu", 0),
    ("none", 1),
    ("none", 0),
    ("ram", 0),
)
PRECISIONS = ("bf16-mixed", "32")


def fail(message: str) -> None:
    """Stop the check with a message on stderr and exit status 2."""
    print(f"gpu_check: FAILED: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


class Timer(Callback):
    """Wall-clock window and samples of the training batches from WARMUP to the epoch's last one."""

    def __init__(self) -> None:
        self.t0 = self.t1 = 0.0
        self.samples = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == WARMUP:
            torch.cuda.synchronize()
            self.t0 = time.time()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if batch_idx >= WARMUP:
            self.samples += len(batch["x"])
        if batch_idx == trainer.num_training_batches - 1:
            torch.cuda.synchronize()
            self.t1 = time.time()


class Utilisation:
    """GPU 0's utilisation and power, sampled by calling nvidia-smi from a background thread.

    One call per sample, timed here: nothing depends on how nvidia-smi buffers a log of its own.
    """

    QUERY = ["nvidia-smi", "--id=0", "--query-gpu=utilization.gpu,power.draw", "--format=csv,noheader,nounits"]

    def __init__(self, every: float = 0.1):
        self.samples: list[tuple[float, float, float]] = []  # (time.time(), utilisation %, watts)
        self.every, self._stop, self.error = every, threading.Event(), ""
        try:  # once here, so that a broken nvidia-smi stops the check before any run
            self.sample()
        except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as e:
            fail(str(e))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        done = subprocess.run(self.QUERY, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"nvidia-smi failed ({done.returncode}): {(done.stdout + done.stderr).strip()[-300:]}")
        utilisation, watts = (
            float(v) if v.strip() not in ("[N/A]", "N/A") else float("nan") for v in done.stdout.strip().split(",")
        )
        self.samples.append((time.time(), utilisation, watts))

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001 (raised by mean(), in the main thread)
                self.error = f"nvidia-smi sampling stopped: {e!r}"
                return

    def mean(self, t0: float, t1: float) -> tuple[float, float]:
        """Return the mean utilisation (%) and power (W) of the samples between t0 and t1 (time.time())."""
        if self.error:
            raise RuntimeError(self.error)
        inside = [(u, w) for t, u, w in list(self.samples) if t0 <= t <= t1]
        return tuple(float(np.mean(v)) for v in zip(*inside)) if inside else (float("nan"), float("nan"))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def check_device_crops(store: FeatureStore) -> None:
    """Stop unless DeviceFeatures on the GPU cuts the crops the memory-mapped path reads, exactly."""
    t0 = time.perf_counter()
    features = DeviceFeatures(store, "cuda")
    seconds = time.perf_counter() - t0
    train_pos, val_pos = split_positions(store, "training"), split_positions(store, "validation")
    samplers = (
        CropBatchSampler(store.valid_frames, train_pos, 32, 128, 256, seed=5),
        EvenCropSampler(store.valid_frames, val_pos, 32, 256),
    )
    for sampler in samplers:
        for b, items in enumerate(sampler):
            if b == 20:
                break
            index = read_batch(store, items, index_only=True)
            x = features.crops(index["position"].pin_memory(), index["start"].pin_memory(), index["lengths"])
            if not torch.equal(x.cpu(), read_batch(store, items)["x"]):
                fail(f"crops cut on the GPU differ from the memory-mapped ones ({type(sampler).__name__}, batch {b})")
    print(f"device crops: equal to the memory-mapped path's ({features.nbytes / 1e9:.1f} GB copied in {seconds:.1f} s)")
    del features
    torch.cuda.empty_cache()


def one_run(
    store_path: Path, out: Path, model: str, precision: str, cache: str, workers: int, util: Utilisation
) -> dict:
    """Train one epoch; return samples/s, GPU utilisation, train_loss and peak memory."""
    fit = FitConfig(
        model=model, epochs=1, batch_size=32, workers=workers, accelerator="gpu", cache=cache, precision=precision
    )
    timer = Timer()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train(store_path, out, fit, TrainConfig(), progress=False, callbacks=[timer])
    wall = time.perf_counter() - t0
    if not timer.t1 > timer.t0 > 0:
        raise RuntimeError(f"the epoch had fewer than {WARMUP + 1} training batches: use more --tracks")
    metrics = (out / "logs" / "metrics.csv").read_text().splitlines()
    train_loss = float(dict(zip(metrics[0].split(","), metrics[1].split(",")))["train_loss"])
    return {
        "samples_per_s": timer.samples / (timer.t1 - timer.t0),
        **dict(zip(("gpu_util", "watts"), util.mean(timer.t0, timer.t1))),
        "train_loss": train_loss,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracks", type=int, default=20_000, help="tracks in the synthetic store")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the store (default: a temp folder)")
    parser.add_argument("--models", nargs="+", default=["gru", "transformer"], choices=["gru", "transformer"])
    parser.add_argument("--budget", type=float, default=270.0, help="seconds after which no new run starts")
    args = parser.parse_args()
    started = time.monotonic()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # the runs' log lines
    if not torch.cuda.is_available():
        fail(f"no CUDA GPU visible to torch {torch.__version__} (a CPU build?)")
    if shutil.which("nvidia-smi") is None:
        fail("nvidia-smi is not on PATH")
    name = torch.cuda.get_device_name(0)
    print(f"GPU: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}")
    root = args.dir or Path(tempfile.mkdtemp(prefix="genreclf-gpu-check-"))
    store_path = root / "gpu_check.store"
    write_store(store_path, args.tracks)
    store = FeatureStore.open(store_path)
    check_device_crops(store)
    util = Utilisation()
    results, failed, skipped = [], [], []
    try:
        for model in args.models:
            for precision in PRECISIONS:
                for cache, workers in PATHS:
                    key = dict(model=model, precision=precision, cache=cache, workers=workers)
                    if time.monotonic() - started > args.budget:
                        skipped.append(key)
                        continue
                    out = root / "runs" / f"{model}-{precision}-{cache}-w{workers}"
                    shutil.rmtree(out, ignore_errors=True)
                    try:
                        row = {**key, **one_run(store_path, out, model, precision, cache, workers, util)}
                    except Exception:  # noqa: BLE001 (reported loudly, the other runs go on)
                        print(f"gpu_check: RUN FAILED: {key}", file=sys.stderr)
                        traceback.print_exc()
                        failed.append(key)
                        continue
                    results.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        util.stop()
    training = len(split_positions(store, "training"))
    print(f"\n{name}, {args.tracks:,} tracks ({training:,} training), batch 32, crops 128-256")
    print(
        f"{'model':<12}{'precision':<12}{'cache':<7}{'workers':>8}{'samples/s':>11}{'GPU util %':>12}{'W':>6}"
        f"{'train_loss':>12}{'peak GiB':>10}{'wall s':>8}"
    )
    for r in results:
        print(
            f"{r['model']:<12}{r['precision']:<12}{r['cache']:<7}{r['workers']:>8}{r['samples_per_s']:>11.0f}"
            f"{r['gpu_util']:>12.0f}{r['watts']:>6.0f}{r['train_loss']:>12.4f}{r['peak_gib']:>10.1f}"
            f"{r['wall_s']:>8.0f}"
        )
    for key in failed:
        print(f"FAILED  {key}")
    for key in skipped:
        print(f"SKIPPED (--budget {args.budget:.0f} s reached) {key}")
    print(f"total {time.monotonic() - started:.0f} s")
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    if failed:
        raise SystemExit(1)
    if skipped:
        raise SystemExit(3)


if __name__ == "__main__":
    main()
