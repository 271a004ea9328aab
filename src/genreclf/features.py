"""Featurize a corpus: audio files -> log-mel features in a FeatureStore.

On a CPU the fastest layout is one single-threaded process per core, each doing
decode + resample + log-mel for one clip at a time (batching the STFT of many clips
on a CPU is slower per clip); the parent process only writes rows to the store.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from genreclf import audio, metadata
from genreclf.audio import N_FRAMES, N_MELS, N_SAMPLES, SignalConfig
from genreclf.errors import GenreclfError, first_line
from genreclf.mel import log_mel, log_mel_batch, pad_or_trim, valid_frames
from genreclf.atomic import atomic_write_text
from genreclf.store import FeatureStore, PartWriter, StoreHeader, part_name

__all__ = ["FeatureStore", "FeaturizeResult", "featurize", "featurize_file", "log_mel", "log_mel_batch"]

log = logging.getLogger(__name__)

# FMA's archive folder names, in order of preference: the 30-s clips of the reference recipe
# (large holds medium holds small), then fma_full's untrimmed tracks (their first 30 s).
AUDIO_FOLDERS = ("fma_large", "fma_medium", "fma_small", "fma_full")
MIN_SECONDS = 1.0  # shorter clips are recorded as failed: too little audio to tag


@dataclass(frozen=True)
class FeaturizeResult:
    """What a featurize run did."""

    store: Path
    tracks: int  # tracks planned for this part
    done: int  # tracks with features (this run and earlier runs)
    failed: int  # tracks recorded in failed.csv
    seconds: float  # wall time of this run
    complete: bool  # True once every part of the store is finished


def decode_clip(path: str | Path, min_seconds: float = MIN_SECONDS) -> tuple[np.ndarray, int]:
    """Return (30-s waveform, padded or cropped, valid frames) of one clip; too short is an AudioError."""
    wave = audio.load(path, max_seconds=N_SAMPLES / audio.SAMPLE_RATE)
    seconds = len(wave) / audio.SAMPLE_RATE
    if seconds < min_seconds:
        raise audio.AudioError(f"{path}: too short ({seconds:.2f} s < {min_seconds} s)")
    return pad_or_trim(wave), valid_frames(len(wave), N_FRAMES)


def featurize_file(path: str | Path, min_seconds: float = MIN_SECONDS) -> tuple[np.ndarray, int]:
    """Return (float16 features (938, 128), valid frames) of one clip, padded or cropped to 30 s."""
    wave, n_valid = decode_clip(path, min_seconds)
    return log_mel(wave).astype(np.float16), n_valid


def shard_from_env() -> tuple[int, int]:
    """Return (RANK, WORLD_SIZE) when launched by torchrun or SLURM, else (0, 1)."""
    for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank in os.environ and world in os.environ:
            return int(os.environ[rank]), int(os.environ[world])
    return 0, 1


def default_workers() -> int:
    """One worker process per usable core, shared among the ranks on this machine under torchrun."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _check_device(device: str | None) -> str | None:
    """Return the torch device for batched log-mel (None: log-mel in the workers), or a one-line error."""
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # one GPU per rank under torchrun
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise GenreclfError(f"cannot use --device {device}: {first_line(e, None)}; "
                            "use cpu, cuda or cuda:N for a GPU this machine has") from None
    return device


def _check_paths(jobs: list[tuple[int, str, float, bool]], audio_root: Path, sample: int = 100) -> None:
    """Refuse to start when none of the first `sample` planned audio files exists: a wrong --audio or --data."""
    head = jobs[:sample]
    if head and not any(Path(path).is_file() for _, path, _, _ in head):
        raise GenreclfError(f"none of the first {len(head)} audio files exists under {audio_root} "
                            f"(e.g. {head[0][1]}); check --data / --audio")


def find_audio_dir(data_dir: Path) -> Path:
    """Return the FMA audio folder inside `data_dir`: fma_large, fma_medium, fma_small, else fma_full."""
    for name in AUDIO_FOLDERS:
        if (data_dir / name).is_dir():
            return data_dir / name
    raise GenreclfError(
        f"{data_dir}: no audio folder ({', '.join(AUDIO_FOLDERS)}); unzip FMA's audio archive there "
        "or pass --audio DIR"
    )


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one clip per process: threads would only contend


def _work(job: tuple[int, str, float, bool]) -> tuple[int, np.ndarray | None, int, str]:
    """Featurize (or, for batched log-mel on a GPU, only decode) one clip; failures become reasons."""
    row, path, min_seconds, decode_only = job
    try:
        array, n_valid = (decode_clip if decode_only else featurize_file)(path, min_seconds)
        return row, array, n_valid, ""
    except audio.AudioError as e:
        return row, None, 0, str(e)
    except Exception as e:  # a decoder bug on one odd file must not stop a 10-hour job
        return row, None, 0, f"{path}: unexpected {type(e).__name__}: {e}"


def featurize(
    data_dir: str | Path,
    out: str | Path,
    subset: str | None = None,
    labels: str = "genres",
    audio_dir: str | Path | None = None,
    workers: int | None = None,
    shard: tuple[int, int] | None = None,
    min_seconds: float = MIN_SECONDS,
    device: str | None = None,
    retry_failed: bool = False,
    progress: bool = True,
) -> FeaturizeResult:
    """Featurize the FMA-layout corpus in `data_dir` into the store `out`; resumes an unfinished run.

    `data_dir` holds `fma_metadata/` (tracks.csv, genres.csv) and an audio folder such as
    `fma_large/AAA/AAABBB.mp3`. Tracks whose audio is missing or undecodable are recorded
    in failed.csv and the job goes on. `shard=(k, n)` featurizes every n-th track from k
    into part k of n; the store opens once all parts are finished. `retry_failed` tries the
    tracks recorded as failed again. With a `device` (default:
    "cuda" when a GPU is present) workers only decode and the log-mel is batched on it.
    """
    t0 = time.perf_counter()
    data_dir, out = Path(data_dir), Path(out)
    k, n_shards = shard or shard_from_env()
    if not 0 <= k < n_shards:
        raise GenreclfError(f"shard {k}/{n_shards} is out of range; use K/N with 0 <= K < N")
    meta_dir = data_dir / "fma_metadata" if (data_dir / "fma_metadata").is_dir() else data_dir
    labels_ = metadata.load_fma(meta_dir, labels=labels, subset=subset)
    audio_root = (Path(audio_dir) if audio_dir else find_audio_dir(data_dir)).resolve()
    if not audio_root.is_dir():
        raise GenreclfError(f"{audio_root}: no such audio folder; give --audio the folder that holds AAA/AAABBB.mp3")
    device = _check_device(device)
    header = StoreHeader(
        signal=SignalConfig(),
        genres=list(labels_.genres),
        genre_ids=[int(g) for g in labels_.genre_ids],
        genre_parents=[int(g) for g in labels_.genre_parents],
        genre_top_level=[int(g) for g in labels_.genre_top_level],
        labels=labels,
        subset=subset or "full",
        n_parts=n_shards,
        source=str(data_dir.resolve()),
    )
    _write_header(out, header)

    order = np.argsort(labels_.track_ids, kind="stable")[k::n_shards]
    plan = pd.DataFrame(
        {
            "track_id": labels_.track_ids[order],
            "split": np.asarray(labels_.split)[order],
            "artist_id": labels_.artist_ids[order],
            "genre_top": np.asarray(labels_.genre_top)[order],
            "path": [str(metadata.audio_path(audio_root, t)) for t in labels_.track_ids[order]],
        }
    )
    writer = PartWriter(out / part_name(k, n_shards), plan, labels_.targets[order], N_FRAMES, N_MELS)
    if retry_failed:
        writer.retry_failed()
    pending = writer.pending_rows()
    jobs = [(int(r), plan.at[int(r), "path"], min_seconds, device is not None) for r in pending]
    if not (writer.state > 0).any():  # nothing featurized yet: a wrong folder would fail every track
        _check_paths(jobs, audio_root)
    n_workers = max(1, min(workers or default_workers(), len(jobs) or 1))
    log.info("featurizing %d of %d tracks into %s with %d worker(s)%s", len(jobs), len(plan), out, n_workers,
             f", log-mel batched on {device}" if device else "")
    bar = tqdm(total=len(plan), initial=len(plan) - len(jobs), unit="clip", desc="featurize",
               disable=not progress, dynamic_ncols=True, smoothing=0.05)
    try:
        _run(jobs, writer, bar, n_workers, device)
    except BaseException:  # Ctrl-C included: keep every finished row for the next run
        writer.close()
        raise
    finally:
        bar.close()
    counts = writer.finish()
    complete = all((out / part_name(i, n_shards) / "part.json").exists() for i in range(n_shards))
    result = FeaturizeResult(out, counts["tracks"], counts["done"], counts["failed"], time.perf_counter() - t0, complete)
    log.info("%s: %d tracks featurized, %d failed (see failed.csv), %.1f s", out, result.done, result.failed,
             result.seconds)
    return result


def _write_header(out: Path, header: StoreHeader) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "store.json"
    if path.exists():
        old = StoreHeader.read(out)
        # The corpus folder may be mounted elsewhere on another machine of a sharded run: not compared.
        if dataclasses.replace(old, source=header.source) != header:
            raise GenreclfError(
                f"{out} holds a store made with other options (labels, subset, shards or corpus); "
                "use a new --out folder or delete it"
            )
        return
    atomic_write_text(path, header.to_json())


def _pool_map(jobs: list[tuple], n_workers: int, record, work=None) -> None:
    """Run `work` (default: _work) on every job in `n_workers` processes and pass each result to `record`, in any order.

    Jobs go to the workers CHUNK at a time, at most IN_FLIGHT_PER_WORKER chunks per worker.
    A worker that dies (a decoder crashing on a corrupt file, the out-of-memory killer)
    breaks the pool: the jobs it may have held are then run one by one in fresh processes,
    the one that kills its process again is recorded as failed, and the job goes on.
    """
    work, queue, finished = work or _work, deque(jobs), [0]

    def count(result: tuple) -> None:
        finished[0] += 1
        record(result)

    while queue:
        suspects, alone, crashed = _pool_until_broken(queue, n_workers, count, work), None, []
        for job in suspects:
            alone = alone or _executor(1)
            try:
                count(alone.submit(work, job).result())
            except BrokenProcessPool:
                alone.shutdown(wait=False)
                alone = None
                crashed.append(job)
        if alone is not None:
            alone.shutdown()
        if crashed and finished[0] == 0:  # no process ever finished a clip: they cannot start
            raise GenreclfError(
                f"featurize's worker processes died on all of the {len(crashed)} clips they were given and "
                "finished none; called from a script? put the call under `if __name__ == \"__main__\":` "
                "(or check memory and the audio files)")
        for job in crashed:
            count((job[0], None, 0, f"{job[1]}: the decoder crashed (its process died); the file is "
                                    "probably corrupt"))


def _executor(n_workers: int) -> ProcessPoolExecutor:
    # spawn: fork after torch/OpenMP start-up can deadlock
    return ProcessPoolExecutor(n_workers, mp_context=mp.get_context("spawn"), initializer=_worker_init)


CHUNK = 4  # clips per task: fewer round trips between the parent and its workers
IN_FLIGHT_PER_WORKER = 2  # tasks queued per worker: decoded clips never pile up in the parent


def _run_chunk(work, chunk: list[tuple]) -> list:
    return [work(job) for job in chunk]


def _pool_until_broken(queue: deque, n_workers: int, record, work) -> list:
    """Work through `queue`; if the pool breaks, return the jobs that were in flight (else [])."""
    in_flight: dict = {}
    pool = _executor(n_workers)
    try:
        while queue or in_flight:
            while queue and len(in_flight) < IN_FLIGHT_PER_WORKER * n_workers:
                chunk = [queue.popleft() for _ in range(min(CHUNK, len(queue)))]
                in_flight[pool.submit(_run_chunk, work, chunk)] = chunk
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            broken = []
            for future in done:
                chunk = in_flight.pop(future)
                try:
                    results = future.result()
                except BrokenProcessPool:
                    broken += chunk
                    continue
                for result in results:
                    record(result)
            if broken:
                suspects = broken + [job for chunk in in_flight.values() for job in chunk]
                log.warning("a featurize worker died; re-running its %d clip(s) one by one", len(suspects))
                return suspects
        return []
    finally:
        pool.shutdown(wait=not in_flight, cancel_futures=True)


def _run(jobs: list[tuple[int, str, float, bool]], writer: PartWriter, bar: tqdm, n_workers: int,
         device: str | None, batch_size: int = 32) -> None:
    last_flush = time.monotonic()
    waves: list[tuple[int, np.ndarray, int]] = []  # decoded clips waiting for batched log-mel

    def flush_batch() -> None:
        x = torch.from_numpy(np.stack([w for _, w, _ in waves])).to(device)
        with torch.no_grad():
            feats = log_mel_batch(x).to(torch.float16).cpu().numpy()
        for (row, _, n_valid), f in zip(waves, feats):
            writer.write(row, f, n_valid)
        bar.update(len(waves))
        waves.clear()

    def record(result: tuple[int, np.ndarray | None, int, str]) -> None:
        nonlocal last_flush
        row, array, n_valid, reason = result
        if array is None:
            writer.fail(row, reason)
            log.warning("%s", reason)
            bar.update(1)
        elif device is not None:
            waves.append((row, array, n_valid))
            if len(waves) == batch_size:
                flush_batch()
        else:
            writer.write(row, array, n_valid)
            bar.update(1)
        if time.monotonic() - last_flush > 5.0:
            writer.flush()
            last_flush = time.monotonic()

    _pool_map(jobs, n_workers, record)
    if waves:
        flush_batch()
