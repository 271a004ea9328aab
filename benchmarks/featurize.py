"""Featurization benchmark: decode-only vs the reference librosa recipe vs genreclf, on the same MP3s.

    python benchmarks/featurize.py --clips 16 --seconds 30 [--workers 2] [--dir DIR]

Writes 2N synthetic 44.1-kHz stereo CBR MP3s (256 and 320 kbit/s, as FMA's) in an FMA
layout, then measures in one run on the same N files (every other track of the 2N):
  (a) decode only: soundfile (libsndfile/mpg123, our first decoder) and PyAV (FFmpeg),
  (b) the reference recipe: librosa.load(sr=16000) + melspectrogram(n_mels=128) +
      power_to_db(ref=np.max), one float32 .npy per track (saving timed too),
  (c) ours: genreclf.featurize.featurize_file + a row of a float16 memmap,
  (d) the CPU part of ours when a GPU computes the log-mel (featurize's GPU layout: workers
      decode, down-mix, resample and pad; the parent batches the log-mel on the GPU),
all single-threaded in this process (CPU ms per clip = per-core cost), interleaved clip by
clip over --rounds rounds (per clip the fastest round counts), then
  (e) genreclf.featurize.featurize over the corpus with 1 and W worker processes, and over
      the 2N clips, each in a fresh subprocess (wall clips/s, CPU incl. children, peak RSS).
"""

from __future__ import annotations

import os

ORIGINAL_ENV = dict(os.environ)  # featurize subprocesses run with the user's own thread settings
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # set before numpy loads: per-core numbers for both recipes

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
from common import build_corpus, describe_machine  # noqa: E402

TARGET_DECODE_RATIO = 1.25  # ours CPU / decode-only CPU, at most
TARGET_SPEEDUP = 1.4  # ours clips/s per core / reference clips/s per core, at least
TARGET_DIFF = 1e-3  # max |ours - reference| on the normalised features


@dataclass
class Timing:
    name: str
    clips: int
    wall: float  # seconds for all clips: per clip, the fastest of the rounds
    cpu: float  # seconds, process_time (this process only: single-threaded runs), likewise
    cpu_rounds: list[float]  # seconds for all clips in each round

    def row(self, base: Timing | None = None) -> str:
        ratio = f"{self.cpu / base.cpu:7.2f}x" if base else " " * 8
        return f"  {self.name:<44} {self.clips / self.wall:8.2f} {1000 * self.cpu / self.clips:9.1f}   {ratio}"

    def ratio_range(self, base: Timing) -> tuple[float, float]:
        """The lowest and highest ratio of this CPU time to `base`'s over the rounds."""
        ratios = [a / b for a, b in zip(self.cpu_rounds, base.cpu_rounds)]
        return min(ratios), max(ratios)


def measure(recipes: dict, items: list, rounds: int) -> dict[str, Timing]:
    """Time every recipe on every item, interleaved (item by item, recipe by recipe), `rounds` times.

    Interleaving puts every recipe under the same background load; per item, the fastest
    round is kept: on a shared machine that is the run least disturbed by others.
    """
    wall = {name: np.zeros((rounds, len(items))) for name in recipes}
    cpu = {name: np.zeros((rounds, len(items))) for name in recipes}
    for r in range(rounds):
        for j, item in enumerate(items):
            for name, fn in recipes.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn(item)
                cpu[name][r, j], wall[name][r, j] = time.process_time() - c0, time.perf_counter() - t0
    return {
        name: Timing(
            name,
            len(items),
            float(wall[name].min(axis=0).sum()),
            float(cpu[name].min(axis=0).sum()),
            cpu[name].sum(axis=1).tolist(),
        )
        for name in recipes
    }


# ---------------------------------------------------------------------------- recipes


def reference_features(path: Path) -> np.ndarray:
    """The reference recipe: librosa.load(sr=16000), 30 s, melspectrogram, power_to_db(ref=max)."""
    import librosa

    y, sr = librosa.load(path, sr=16000)
    y = librosa.util.fix_length(y, size=30 * 16000)
    mel = librosa.feature.melspectrogram(y=y, sr=sr, n_mels=128)
    return ((librosa.power_to_db(mel, ref=np.max) + 40) / 40).T


def reference_mel_of(wave: np.ndarray) -> np.ndarray:
    """The reference's mel + dB on an already decoded 16-kHz waveform."""
    import librosa

    mel = librosa.feature.melspectrogram(y=wave, sr=16000, n_mels=128)
    return ((librosa.power_to_db(mel, ref=np.max) + 40) / 40).T


def profile_ours(paths: list[Path], rounds: int) -> list[Timing]:
    """Time each step of featurize_file separately (same order, same functions)."""
    import torch

    from genreclf import audio, mel

    decoded = [audio._decode_soundfile(p, 30.0) for p in paths]
    monos = [audio.downmix(a) for a, _ in decoded]
    waves = [mel.pad_or_trim(audio.resample(m, r)) for m, (_, r) in zip(monos, decoded)]
    window, sparse = mel._constants("cpu")  # the filterbank as genreclf uses it on a CPU (sparse CSR)
    dense = torch.from_numpy(mel.mel_filterbank())
    x = [torch.from_numpy(w)[None] for w in waves]
    specs = [torch.stft(v, 2048, 512, window=window, center=True, pad_mode="constant", return_complex=True) for v in x]
    powers = [s.real.square() + s.imag.square() for s in specs]
    mels = [torch.matmul(dense, p) for p in powers]
    feats = [mel.log_mel(w) for w in waves]
    assert all(np.array_equal(a.mean(axis=1, dtype=np.float32), m) for (a, _), m in zip(decoded, monos))  # same bits
    steps = {
        "  soundfile decode (up to 31 s)": lambda i: audio._decode_soundfile(paths[i], 30.0),
        "  stereo -> mono, numpy mean(axis=1) [was]": lambda i: decoded[i][0].mean(axis=1, dtype=np.float32),
        "  stereo -> mono, audio.downmix": lambda i: audio.downmix(decoded[i][0]),
        "  soxr HQ 44.1 -> 16 kHz": lambda i: audio.resample(monos[i], decoded[i][1]),
        "  torch.stft (2048/512, centred)": lambda i: torch.stft(
            x[i], 2048, 512, window=window, center=True, pad_mode="constant", return_complex=True
        ),
        "  |X|^2, real.square() + imag.square() [was]": lambda i: specs[i].real.square() + specs[i].imag.square(),
        "  |X|^2, view_as_real (genreclf squares in place)": lambda i: _power(specs[i]),
        "  mel matmul, dense 128 x 1025 [was]": lambda i: torch.matmul(dense, powers[i]),
        "  mel matmul, sparse CSR": lambda i: sparse @ powers[i][0],
        "  log10, ref=max, top_db, scale": lambda i: _db(mels[i]),
        "  log_mel total (torch, to numpy)": lambda i: mel.log_mel(waves[i]),
        "  float32 -> float16": lambda i: feats[i].astype(np.float16),
    }
    with torch.no_grad():
        return list(measure(steps, list(range(len(paths))), rounds).values())


def _power(spec):
    """The |X|^2 step of genreclf.mel.log_mel_batch, alone (out of place: the spectrum is reused)."""
    import torch

    parts = torch.view_as_real(spec).square()
    return parts[..., 0] + parts[..., 1]


def _db(mel_power):
    """The dB and normalisation step of genreclf.mel.log_mel_batch, alone."""
    import torch

    db = 10.0 * torch.log10(torch.clamp(mel_power, min=1e-10))
    db = torch.maximum(db - db.amax(dim=(1, 2), keepdim=True), torch.tensor(-80.0))
    return (db + 40.0) / 40.0


def max_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------------------- featurize in a subprocess


def _peak_rss_mb(pid: int | str = "self") -> float:
    """VmHWM of a process in MB: unlike ru_maxrss it restarts at exec, so a parent's size does not leak in."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def run_featurize_child(args: dict) -> dict:
    """Run genreclf featurize in this (fresh) process and return its wall, CPU and peak RSS."""
    import threading

    from genreclf.featurize import featurize

    peak_worker, stop = [0.0], threading.Event()
    state_file = Path(args["out"]) / f"part-{args['shard'][0]}-of-{args['shard'][1]}" / "state.npy"
    progress: list[tuple[float, int]] = []  # (time, rows done): the steady rate, without pool start-up

    def watch() -> None:  # the pool's workers live only during featurize: sample their VmHWM
        while not stop.wait(0.05):
            for kid in _children(os.getpid()):
                peak_worker[0] = max(peak_worker[0], _peak_rss_mb(kid))
            with contextlib.suppress(OSError, ValueError):  # the state file may be mid-rewrite
                progress.append((time.perf_counter(), int(np.count_nonzero(np.load(state_file)))))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    me0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    result = featurize(args["data"], args["out"], workers=args["workers"], shard=tuple(args["shard"]), progress=False)
    wall = time.perf_counter() - t0
    stop.set()
    watcher.join()
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = result.done + result.failed
    quarter = next(((t, k) for t, k in progress if k >= total // 4), None)
    steady = (total - quarter[1]) / (t0 + wall - quarter[0]) if quarter and quarter[1] < total else float("nan")
    return {
        "done": result.done,
        "wall": wall,
        "steady_rate": steady,
        "cpu": me.ru_utime + me.ru_stime - me0.ru_utime - me0.ru_stime + kids.ru_utime + kids.ru_stime,
        "rss_parent": _peak_rss_mb(),
        "rss_worker": peak_worker[0],
    }


def featurize_in_subprocess(data: Path, out: Path, workers: int, shard: tuple[int, int]) -> dict:
    job = {"data": str(data), "out": str(out), "workers": workers, "shard": list(shard)}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(job)],
        env=ORIGINAL_ENV,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"featurize subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- main


def machine() -> str:
    import librosa

    versions = f"librosa {librosa.__version__}, soundfile {sf.__version__} (libsndfile {sf.__libsndfile_version__})"
    return describe_machine(versions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=16, help="clips per measurement (2x are generated)")
    parser.add_argument("--seconds", type=float, default=30.0, help="clip length (default 30)")
    parser.add_argument("--workers", type=int, default=2, help="processes for the scaling run (default 2)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved timing rounds; per clip the fastest counts (default 3)"
    )
    parser.add_argument("--dir", type=Path, default=None, help="work folder, kept (default: a temp folder)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_featurize_child(json.loads(args.child))))
        return

    import librosa
    import torch

    from genreclf import audio
    from genreclf.featurize import decode_clip, featurize_file
    from genreclf.mel import log_mel, pad_or_trim

    torch.set_num_threads(1)
    print(f"machine: {machine()}")
    work = args.dir or Path(tempfile.mkdtemp(prefix="genreclf-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus"
    all_paths = build_corpus(corpus, 2 * args.clips, args.seconds, max(1, args.workers))
    paths = all_paths[0::2]  # = featurize's shard 0/2, so (c) and (d) see the same files
    n = len(paths)
    kbps = [8 * p.stat().st_size / args.seconds / 1000 for p in paths]
    print(
        f"clips: {n} x {args.seconds:g} s, 44.1 kHz stereo MP3, {min(kbps):.0f}-{max(kbps):.0f} kbit/s, "
        f"{sum(p.stat().st_size for p in paths) / n / 1e6:.2f} MB each"
    )

    # Warm-up: librosa's first call compiles and caches; torch builds its window and filters.
    reference_features(paths[0])
    featurize_file(paths[0])
    for p in paths:  # read every file once so that all recipes start from the page cache
        p.read_bytes()

    ref_dir = work / "reference_npy"
    ref_dir.mkdir(exist_ok=True)
    store = np.lib.format.open_memmap(work / "ours_features.npy", "w+", np.float16, (n, 938, 128))

    def reference(i: int) -> None:
        np.save(ref_dir / f"{paths[i].stem}.npy", reference_features(paths[i]).astype(np.float32))

    def ours(i: int) -> None:
        store[i] = featurize_file(paths[i])[0]

    timings = measure(
        {
            "(a) decode only: soundfile": lambda i: sf.read(paths[i], dtype="float32"),
            "(a) decode only: PyAV": lambda i: audio._decode_pyav(paths[i], None),
            "(b) reference: librosa + float32 .npy": reference,
            "(c) ours: featurize_file + float16 memmap": ours,
            "(d) ours, GPU layout: CPU part (decode_clip)": lambda i: decode_clip(paths[i]),
        },
        list(range(n)),
        args.rounds,
    )
    store.flush()
    decode_sf, decode_av, ref, mine, cpu_part = timings.values()
    rss_single = max_rss_mb()
    steps = profile_ours(paths, args.rounds)

    # Agreement, on the same files and on the same decoded audio.
    diff_stored = diff_mel = diff_wave = 0.0
    for i, p in enumerate(paths):
        theirs = np.load(ref_dir / f"{p.stem}.npy")
        diff_stored = max(diff_stored, float(np.abs(store[i].astype(np.float32) - theirs).max()))
        wave = audio.load(p)
        y, _ = librosa.load(p, sr=16000)
        m = min(len(wave), len(y))
        diff_wave = max(diff_wave, float(np.abs(wave[:m] - y[:m]).max()) + abs(len(wave) - len(y)))
        w = pad_or_trim(wave)
        diff_mel = max(diff_mel, float(np.abs(log_mel(w) - reference_mel_of(w)).max()))

    # Scaling and memory: fresh processes, the user's thread settings; N and 2N clips each, so that
    # the difference gives the steady state without process start-up.
    runs = {}
    for workers in sorted({1, args.workers}):
        for shard in ((0, 2), (0, 1)):
            out = work / f"store-{workers}-{shard[1]}"
            if out.exists():
                shutil.rmtree(out)
            runs[workers, shard[1]] = featurize_in_subprocess(corpus, out, workers, shard)
    store_bytes = (work / "store-1-2/part-0-of-2/features.npy").stat().st_size / n
    ref_bytes = sum((ref_dir / f"{p.stem}.npy").stat().st_size for p in paths) / n

    print(
        f"\nsingle process, one thread, {n} clips (page cache warm), recipes interleaved clip by clip; "
        f"per clip the fastest of {args.rounds} rounds"
    )
    print(f"  {'':<44} {'clips/s':>8} {'CPU ms/clip':>11} {'vs decode':>9}")
    for t in (decode_sf, decode_av, ref, mine, cpu_part):
        print(t.row(decode_sf))
    print("  ours, step by step:")
    for t in steps:
        print(t.row(decode_sf))
    print("\nfeaturize (genreclf.featurize.featurize, fresh subprocess; imports excluded, pool start-up included)")
    print(f"  {'':<22} {'clips':>5} {'clips/s':>8} {'CPU ms/clip':>11}   {'peak RSS parent / worker MB':>27}")
    steady = {}
    for (workers, parts), r in runs.items():
        label = f"{workers} worker{'s' * (workers > 1)}, {'N' if parts == 2 else '2N'}"
        print(
            f"  {label:<22} {r['done']:5d} {r['done'] / r['wall']:8.2f} {1000 * r['cpu'] / r['done']:11.1f}   "
            f"{r['rss_parent']:16.0f} / {r['rss_worker']:.0f}"
        )
        if parts == 1:
            steady[workers] = r["steady_rate"]
    for workers, rate in steady.items():
        label = f"{workers} worker{'s' * (workers > 1)}, 2N"
        print(f"  {label:<22} {'':5} {rate:8.2f} {'':11}   (steady state: after the first quarter of the clips)")

    fastest = min(decode_sf, decode_av, key=lambda t: t.cpu)
    ratio, (ratio_lo, ratio_hi) = mine.cpu / fastest.cpu, mine.ratio_range(fastest)
    gpu_ratio, (gpu_lo, gpu_hi) = cpu_part.cpu / fastest.cpu, cpu_part.ratio_range(fastest)
    speedup, (speed_lo, speed_hi) = ref.cpu / mine.cpu, ref.ratio_range(mine)  # per core: single-threaded CPU
    print("\nsummary (fastest rounds; in brackets the range over the rounds)")
    print(
        f"  ours / decode-only CPU ({fastest.name.split(': ')[-1]:<9})        {ratio:6.2f}   "
        f"[{ratio_lo:.2f}-{ratio_hi:.2f}] (target <= {TARGET_DECODE_RATIO})"
        f"  {'ok' if ratio <= TARGET_DECODE_RATIO else 'MISSED'}"
    )
    print(
        f"  the same, log-mel on a GPU: CPU part only   {gpu_ratio:6.2f}   [{gpu_lo:.2f}-{gpu_hi:.2f}] "
        f"(target <= {TARGET_DECODE_RATIO})  {'ok' if gpu_ratio <= TARGET_DECODE_RATIO else 'MISSED'} "
        "(workers decode + resample; the GPU's batched log-mel is not measured here)"
    )
    print(
        f"  ours / reference clips/s per core (CPU)     {speedup:6.2f}   [{speed_lo:.2f}-{speed_hi:.2f}] "
        f"(target >= {TARGET_SPEEDUP})  {'ok' if speedup >= TARGET_SPEEDUP else 'MISSED'}; "
        f"by wall clock {ref.wall / mine.wall:.2f}"
    )
    print(
        f"  max |ours - reference|, stored float16      {diff_stored:.2e} (target <= {TARGET_DIFF:g})"
        f"  {'ok' if diff_stored <= TARGET_DIFF else 'MISSED'}"
    )
    print(f"  max |ours - reference|, float32, same audio {diff_mel:.2e}")
    print(f"  max |our decode - librosa.load|             {diff_wave:.2e}")
    if args.workers > 1:
        print(
            f"  featurize steady-state scaling 1 -> {args.workers} workers "
            f"{steady[args.workers] / steady[1]:6.2f}x (steady state)"
        )
    print(
        f"  bytes per track: ours float16 {store_bytes / 1e3:.0f} KB, reference float32 .npy {ref_bytes / 1e3:.0f} KB"
    )
    w = args.workers
    print(
        f"  featurize peak RSS, N={n} -> 2N={2 * n} clips: parent {runs[w, 2]['rss_parent']:.0f} -> "
        f"{runs[w, 1]['rss_parent']:.0f} MB, worker {runs[w, 2]['rss_worker']:.0f} -> "
        f"{runs[w, 1]['rss_worker']:.0f} MB (this benchmark process: {rss_single:.0f} MB)"
    )
    if args.dir:
        print(f"  files kept in {work}")
    else:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
