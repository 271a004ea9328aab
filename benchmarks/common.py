"""What the benchmarks share: a corpus of FMA-format MP3s and a description of the machine they ran on."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path

import soundfile as sf

BITRATES = {256: 0.2222, 320: 0.0}  # kbit/s -> libsndfile compression_level for CBR MP3 (LAME)


def _reencode(job: tuple[str, int]) -> None:
    path, kbps = job
    data, rate = sf.read(path, dtype="float32", always_2d=True)
    tmp = path + ".tmp.mp3"
    sf.write(
        tmp,
        data,
        rate,
        format="MP3",
        subtype="MPEG_LAYER_III",
        compression_level=BITRATES[kbps],
        bitrate_mode="CONSTANT",
    )
    os.replace(tmp, path)


def build_corpus(root: Path, n: int, seconds: float, workers: int) -> list[Path]:
    """Return the MP3s of an FMA-layout corpus of n clips under root (reused when already there)."""
    from genreclf.synth import make_corpus

    done = root / "benchmark-corpus.json"
    spec = {"clips": n, "seconds": seconds, "bitrates": sorted(BITRATES), "pattern": "(i // 2) % 2"}
    if not (done.exists() and json.loads(done.read_text()) == spec):
        t0 = time.perf_counter()
        make_corpus(root, n, seconds=seconds, seed=0, workers=workers)
        paths = sorted((root / "fma_large").rglob("*.mp3"))
        jobs = [(str(p), 320 if (i // 2) % 2 else 256) for i, p in enumerate(paths)]  # both in each half
        with mp.get_context("spawn").Pool(workers) as pool:
            pool.map(_reencode, jobs)
        done.write_text(json.dumps(spec))
        print(f"corpus: {n} clips of {seconds:g} s written in {time.perf_counter() - t0:.0f} s")
    return sorted((root / "fma_large").rglob("*.mp3"))


def describe_machine(versions: str = "") -> str:
    """Return the CPU, its cores and load, and the versions of Python, torch and `versions` (one line)."""
    import torch

    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    return (
        f"{model}, {os.cpu_count()} CPUs ({usable} usable, load average {load}), Python {platform.python_version()}, "
        f"torch {torch.__version__}" + (f", {versions}" if versions else "")
    )
