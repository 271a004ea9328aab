"""Featurize a corpus: audio files -> log-mel features in a FeatureStore.

On a CPU the fastest layout is one single-threaded process per core, each doing
decode + resample + log-mel for one clip at a time (batching the STFT of many clips
on a CPU is slower per clip); the parent process only writes rows to the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from genreclf import audio, metadata
from genreclf.atomic import atomic_write_text
from genreclf.audio import MIN_SECONDS, N_FRAMES, N_MELS, N_SAMPLES, SignalConfig
from genreclf.crops import valid_frames
from genreclf.errors import GenreclfError, first_line
from genreclf.mel import log_mel, log_mel_batch, pad_or_trim
from genreclf.pool import CLIP_TIMEOUT, default_workers, pool_map
from genreclf.progress import progress_bar
from genreclf.store import PartWriter, StoreHeader, part_name

log = logging.getLogger(__name__)

# FMA's archive folder names, in order of preference: the 30-s clips of the reference recipe
# (large holds medium holds small), then fma_full's untrimmed tracks (their first 30 s).
AUDIO_FOLDERS = ("fma_large", "fma_medium", "fma_small", "fma_full")


@dataclass(frozen=True)
class FeaturizeResult:
    """What a featurize run did."""

    store: Path
    tracks: int  # tracks planned for this part
    done: int  # tracks with features (this run and earlier runs)
    failed: int  # tracks recorded in failed.csv (silent ones included)
    silent: int  # of the failed, those whose audio is silent (below audio.SILENCE_DBFS)
    seconds: float  # wall time of this run
    complete: bool  # True once every part of the store is finished


def decode_clip(path: str | Path, min_seconds: float = MIN_SECONDS) -> tuple[np.ndarray, int]:
    """Return (30-s waveform, padded or cropped, valid frames) of one clip; too short or silent is an AudioError."""
    wave = audio.load(path, max_seconds=N_SAMPLES / audio.SAMPLE_RATE)
    seconds = len(wave) / audio.SAMPLE_RATE
    if seconds < min_seconds:
        raise audio.AudioError(f"{path}: too short ({seconds:.2f} s < {min_seconds} s)")
    wave = pad_or_trim(wave)
    level = audio.rms_dbfs(wave[: int(seconds * audio.SAMPLE_RATE)])
    if level < audio.SILENCE_DBFS:  # log-mel normalised by its own maximum would make silence look loud
        raise audio.AudioError(f"{path}: silent (RMS level {level:.0f} dBFS < {audio.SILENCE_DBFS:.0f} dBFS)")
    return wave, valid_frames(int(seconds * audio.SAMPLE_RATE), N_FRAMES)


def featurize_file(path: str | Path, min_seconds: float = MIN_SECONDS) -> tuple[np.ndarray, int]:
    """Return (float16 features (938, 128), valid frames) of one clip, padded or cropped to 30 s."""
    wave, n_valid = decode_clip(path, min_seconds)
    return log_mel(wave).astype(np.float16), n_valid


def shard_from_env() -> tuple[int, int]:
    """Return (RANK, WORLD_SIZE) when launched by torchrun, or by SLURM's srun, else (0, 1).

    SLURM_PROCID/SLURM_NTASKS are trusted only inside a job step started by srun (SLURM_STEP_ID is a
    step number): a batch script run with `sbatch --ntasks=4` but without srun sees them too, and
    would otherwise quietly featurize part 0 of 4 only.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    step = os.environ.get("SLURM_STEP_ID", "")
    in_srun_step = step.isdigit() and int(step) < SLURM_SPECIAL_STEPS  # not the batch or extern step
    if in_srun_step and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    return 0, 1


SLURM_SPECIAL_STEPS = 0xFFFFFFF0  # SLURM numbers its batch, extern and interactive steps from 0xFFFFFFFA up


def _check_device(device: str | None) -> str | None:
    """Return the torch device for batched log-mel (None: log-mel in the workers), or a one-line error."""
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # one GPU per rank under torchrun
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise GenreclfError(
            f"cannot use --device {device}: {first_line(e, None)}; use cpu, cuda or cuda:N for a GPU this machine has"
        ) from None
    return device


def _check_paths(paths: list[str], audio_root: Path, sample: int = 100) -> None:
    """Refuse to start when none of the first `sample` planned audio files exists: a wrong --audio or --data."""
    head = paths[:sample]
    if head and not any(Path(path).is_file() for path in head):
        raise GenreclfError(
            f"none of the first {len(head)} audio files exists under {audio_root} "
            f"(e.g. {head[0]}); check --data / --audio"
        )


def _has_features(part_dir: Path) -> bool:
    """Return True when an earlier run already featurized some clip of this part."""
    try:
        return bool((np.load(part_dir / "state.npy", mmap_mode="r") > 0).any())
    except (OSError, ValueError):
        return False


def _remove_created(out: Path, part_dir: Path, created: tuple[bool, bool]) -> None:
    """Remove what this run created: its part folder, and the store folder if nothing else is in it.

    Only this run's own part is removed: other shards may be writing their parts beside it.
    """
    created_out, created_part = created
    if created_part and part_dir.exists():
        shutil.rmtree(part_dir, ignore_errors=True)
    sharded = not part_dir.name.endswith("-of-1")  # store.json is shared: another shard may be about to use it
    if created_out and not sharded and out.exists() and not any(p.name.startswith("part-") for p in out.iterdir()):
        (out / "store.json").unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: another process has written there since
            out.rmdir()
    log.debug("removed what this refused run created in %s", out)


def find_audio_dir(data_dir: Path) -> Path:
    """Return the FMA audio folder inside `data_dir`: fma_large, fma_medium, fma_small, else fma_full."""
    for name in AUDIO_FOLDERS:
        if (data_dir / name).is_dir():
            return data_dir / name
    raise GenreclfError(
        f"{data_dir}: no audio folder ({', '.join(AUDIO_FOLDERS)}); unzip FMA's audio archive there or pass --audio DIR"
    )


Result = tuple[int, "np.ndarray | None", int, str, str]  # row, array, valid frames, reason, decoder details


def _work(job: tuple[int, str, float, bool]) -> Result:
    """Featurize (or, for batched log-mel on a GPU, only decode) one clip; failures become reasons."""
    row, path, min_seconds, decode_only = job
    try:
        array, n_valid = (decode_clip if decode_only else featurize_file)(path, min_seconds)
        return row, array, n_valid, "", ""
    except audio.AudioError as e:  # failed.csv has the path in its own column
        return row, None, 0, str(e).removeprefix(f"{path}: "), getattr(e, "details", "") or ""
    except Exception as e:  # a decoder bug on one odd file must not stop a 10-hour job
        return row, None, 0, f"unexpected {type(e).__name__}: {first_line(e)}", str(e)


def _failed_job(job: tuple[int, str, float, bool], reason: str) -> Result:
    """The result of a job whose worker crashed or hung."""
    return job[0], None, 0, reason, ""


def _worker_init() -> None:
    torch.set_num_threads(1)  # one clip per process: threads would only contend


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
    clip_timeout: float = CLIP_TIMEOUT,
) -> FeaturizeResult:
    """Featurize the FMA-layout corpus in `data_dir` into the store `out`; resumes an unfinished run.

    `data_dir` holds `fma_metadata/` (tracks.csv, genres.csv) and an audio folder such as
    `fma_large/AAA/AAABBB.mp3`. Tracks whose audio is missing or undecodable are recorded
    in failed.csv and the job goes on. `shard=(k, n)` featurizes every n-th track from k
    into part k of n; the store opens once all parts are finished. `retry_failed` tries the
    tracks recorded as failed again. With a `device` (default:
    "cuda" when a GPU is present) workers only decode and the log-mel is batched on it.
    A clip whose decoder gives no result within `clip_timeout` seconds fails "timed out".
    Every input is validated before anything is written; a run refused or failing before
    its first clip removes the folders it created.
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
    part_dir = out / part_name(k, n_shards)
    if not _has_features(part_dir):  # nothing featurized yet: a wrong folder would fail every track
        _check_paths(plan["path"].tolist(), audio_root)
    # Every input is checked: only now is anything created (the features file reserves its full size).
    created = (not out.exists(), not part_dir.exists())
    try:
        _write_header(out, header)
        writer = PartWriter(part_dir, plan, labels_.targets[order], N_FRAMES, N_MELS)
    except BaseException:
        _remove_created(out, part_dir, created)
        raise
    if retry_failed:
        writer.retry_failed()
    pending = writer.pending_rows()
    jobs = [(int(r), plan.at[int(r), "path"], min_seconds, device is not None) for r in pending]
    n_workers = max(1, min(workers or default_workers(), len(jobs) or 1))
    log.info(
        "featurizing %d of %d tracks (shard %d of %d) into %s with %d worker(s)%s",
        len(jobs),
        len(plan),
        k,
        n_shards,
        part_dir,
        n_workers,
        f", log-mel batched on {device}" if device else "",
    )
    bar = progress_bar(len(plan), len(plan) - len(jobs), "featurize", "clip", progress)
    try:
        _run(jobs, writer, bar, n_workers, device, clip_timeout)
    except BaseException:  # Ctrl-C included: keep every finished row for the next run ...
        writer.close()
        if not (writer.state[:] != 0).any():  # ... but a run that did nothing leaves nothing behind
            _remove_created(out, part_dir, created)
        raise
    finally:
        bar.close()
    counts = writer.finish()
    complete = all((out / part_name(i, n_shards) / "part.json").exists() for i in range(n_shards))
    result = FeaturizeResult(
        out, counts["tracks"], counts["done"], counts["failed"], counts["silent"], time.perf_counter() - t0, complete
    )
    log.info(
        "%s: %d tracks featurized, %d failed (%d of them silent; see failed.csv), %.1f s",
        out,
        result.done,
        result.failed,
        result.silent,
        result.seconds,
    )
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


def _run(
    jobs: list[tuple[int, str, float, bool]],
    writer: PartWriter,
    bar,
    n_workers: int,
    device: str | None,
    clip_timeout: float,
    batch_size: int = 32,
) -> None:
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

    def record(result: Result) -> None:
        nonlocal last_flush
        row, array, n_valid, reason, details = result
        if array is None:
            writer.fail(row, reason)
            log.warning("%s: %s", writer.plan.at[row, "path"], reason)
            if details:
                log.debug("%s: the decoders said: %s", writer.plan.at[row, "path"], details)
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

    pool_map(jobs, n_workers, record, _work, _failed_job, timeout=clip_timeout, init=_worker_init)
    if waves:
        flush_batch()
