"""Tag audio with a trained model: files, folders or waveforms of any length.

A track is cut into consecutive 30-s windows (the clips the model was trained on, each
normalised on its own as in training); each window is scored by averaging the model's
probabilities over evenly spaced crops; windows are averaged weighted by their real frames. Silent
windows (RMS below audio.SILENCE_DBFS) are skipped, so a quiet intro does not dilute the music; a
silent file gets no genres at all.

`Tagger.predict_many` tags many files at once: worker processes decode each file as a stream of
30-s windows and send each audible window's log-mel features (938 x 128 float32, 480 kB) as soon
as it is ready; the parent scores windows from any files together in batches and yields each
file's result as soon as its last window is scored. The pipes are the backpressure (a worker waits
until the parent has read what it sent), so memory stays at a batch of windows plus a few in each
pipe, whatever the number of files or their length.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch

from genreclf import audio
from genreclf.audio import MIN_SECONDS, N_FRAMES, N_MELS, N_SAMPLES, SAMPLE_RATE
from genreclf.data import crop_starts
from genreclf.decide import Decision
from genreclf.errors import GenreclfError, first_line
from genreclf.mel import log_mel, pad_or_trim, valid_frames
from genreclf.modelfile import ModelFile
from genreclf.pool import CLIP_TIMEOUT, default_workers, pool_imap
from genreclf.timeline import Timeline, assemble, check_step, segments_of, top_genres

log = logging.getLogger(__name__)

CROP_FRAMES = 256  # the longest training crop
N_CROPS = 8  # evenly spaced crops per 30-s window
WINDOWS_PER_BATCH = 8  # 30-s windows scored together (from one file or several)
PREFETCH_WINDOWS = 16  # windows received ahead of the model by predict_many's reader thread (~8 MB)


@torch.no_grad()
def score_features(
    model: torch.nn.Module,
    features: torch.Tensor,
    valid: torch.Tensor,
    crop: int | None = CROP_FRAMES,
    n_crops: int = N_CROPS,
) -> torch.Tensor:
    """Return probabilities (batch, genres) for features (batch, frames, mels) with `valid` real frames.

    crop=None scores each whole sequence at once; otherwise the mean over evenly spaced crops.
    """
    if crop is None:
        return torch.sigmoid(model(features, valid))
    total = torch.zeros(len(features), model.cfg.n_genres, device=features.device)
    counts = torch.zeros(len(features), 1, device=features.device)
    # Tracks of equal valid length share crop positions: score them together.
    for n in torch.unique(valid).tolist():
        rows = torch.nonzero(valid == n).flatten()
        for start in crop_starts(int(n), crop, n_crops):
            length = min(crop, int(n))
            x = features[rows, start : start + length]
            lengths = torch.full((len(rows),), length, device=features.device)
            total[rows] += torch.sigmoid(model(x, lengths))
            counts[rows] += 1
    return total / counts


@dataclass(frozen=True)
class Prediction:
    """The genre probabilities of one input (NaN where it was not scored: silent audio, or an error)."""

    source: str  # file path, or "<waveform>"
    genres: list[str]  # vocabulary order
    probabilities: np.ndarray  # (genres,) float
    decision: Decision | None = None  # the model's thresholds and genre tree, for `chosen`
    warning: str = ""  # e.g. silent audio: no genres given
    error: str = ""  # predict_many only: why the file could not be tagged
    timeline: Timeline | None = None  # genres over time, when asked for

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """Return the k most probable (genre, probability) pairs, most probable first (none if not scored)."""
        return top_genres(self.probabilities, self.genres, k)

    def chosen(self, threshold: float | None = None, with_parents: bool = False) -> list[str]:
        """Return the genres whose probability is >= their threshold (or `threshold`), most probable first.

        with_parents adds the ancestors of each chosen genre (Metal brings Rock), after the chosen ones.
        An input that was not scored (silent audio, or an error) has none.
        """
        if np.isnan(self.probabilities).all():
            return []
        columns = (self.decision or Decision()).chosen(self.probabilities, threshold, with_parents)
        return [self.genres[c] for c in columns]


@dataclass
class _Level:
    """Samples seen and their energy: the RMS level of a file decoded window by window."""

    samples: int = 0
    energy: float = 0.0

    def dbfs(self) -> float:
        """The RMS level in dBFS, as audio.rms_dbfs of the whole waveform (to ~1e-6 relative)."""
        power = self.energy / self.samples if self.samples else 0.0
        return 10.0 * math.log10(power) if power > 0 else float("-inf")


def _audible(
    windows: Iterable[np.ndarray], level: _Level, step: float | None = None, crop: int = CROP_FRAMES
) -> Iterator[tuple[np.ndarray | None, int, tuple[bool, ...]]]:
    """Yield (log-mel features (938, 128) float32, samples, silent timeline segments) of each window.

    Features are None for a silent window; with a timeline `step`, one flag per segment of the window
    (True: silent), else ().
    """
    for index, window in enumerate(windows):
        level.samples += len(window)
        level.energy += float(np.dot(window, window))
        if audio.is_silent(window):
            yield None, len(window), ()
            continue
        segments = () if step is None else segments_of(index, len(window), step, crop)
        silent = tuple(audio.is_silent(window[s.samples()]) for s in segments)
        yield log_mel(pad_or_trim(window)), len(window), silent


def _file_windows(
    path: str | Path,
    level: _Level,
    step: float | None = None,
    crop: int = CROP_FRAMES,
    min_seconds: float = MIN_SECONDS,
) -> Iterator[tuple]:
    """Yield the windows of the file at `path` (see _audible); AudioError when it is too short."""
    windows = audio.stream(path, block_seconds=N_SAMPLES / SAMPLE_RATE)
    first = next(windows, np.zeros(0, np.float32))  # 30 s unless the whole file is shorter
    if len(first) < min_seconds * SAMPLE_RATE:
        raise audio.AudioError(f"{path}: too short ({len(first) / SAMPLE_RATE:.2f} s < {min_seconds} s)")
    yield from _audible(chain([first], windows), level, step, crop)


_WINDOW, _END = "window", "end"


def _file_items(job: tuple[int, str, float | None, int]) -> Iterator[tuple]:
    """Worker: yield (i, "window", features or None, samples, silent segments) per window, then (i, "end", error,
    dBFS, details)."""
    i, path, step, crop = job
    level = _Level()
    try:
        for features, samples, silent in _file_windows(path, level, step, crop):
            yield i, _WINDOW, features, samples, silent
    except GenreclfError as e:  # the decoders' words travel with it: a worker's own logging is not set up
        yield i, _END, str(e), 0.0, getattr(e, "details", "")
        return
    except Exception as e:  # a decoder bug on one odd file must not stop the others
        yield i, _END, f"{path}: unexpected {type(e).__name__}: {first_line(e)}", 0.0, str(e)
        return
    yield i, _END, "", level.dbfs(), ""


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


def _read_ahead(items: Iterator, size: int) -> Iterator:
    """Yield `items`, taken from them by a thread into a queue of `size` (memory bounded) while we work.

    Ends the thread (and closes `items`, so a pool stops its workers) when the caller stops early.
    """
    ahead: queue.Queue = queue.Queue(size)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(item):
                    break
        except BaseException as e:  # raised again in the caller's thread, where it belongs
            put(_Raised(e))
        finally:
            items.close()
            put(_DONE)

    thread = threading.Thread(target=run, name="genreclf-read-ahead", daemon=True)
    thread.start()
    try:
        while (item := ahead.get()) is not _DONE:
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(10)  # a worker that hangs is stopped by the pool's timeout; past this, daemon threads die


def _failed_file(job: tuple[int, str], reason: str) -> tuple:
    """The end item of a file whose worker crashed or hung."""
    return job[0], _END, f"{job[1]}: {reason}", 0.0, ""


def _worker_init() -> None:
    torch.set_num_threads(1)  # one file per process: threads would only contend


def find_inputs(paths: Iterable[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Return (the audio files in `paths`, folders walked recursively; (path, error) for each unusable path)."""
    files, errors = [], []
    for source in paths:
        try:
            found = audio.find_audio_files(source)
        except GenreclfError as e:
            errors.append((str(source), str(e)))
            continue
        if not found:
            errors.append((str(source), f"{source}: no audio files found in this folder"))
        files.extend(found)
    return files, errors


class _Batcher:
    """Windows of many files scored together in batches; per-file frame-weighted sums of probabilities.

    With a timeline `step` (seconds), also each window's segments (see genreclf.timeline), per file.
    """

    def __init__(self, tagger: Tagger, size: int, threads: int | None = None, step: float | None = None):
        self.tagger, self.size, self.step = tagger, size, step
        self.threads = threads  # torch threads while scoring (None: as they are)
        self.features = np.empty((size, N_FRAMES, N_MELS), np.float32)  # one batch buffer: memory bounded
        self.owners: list[int] = []  # the file of each row
        self.valid: list[int] = []
        self.to_score: list[list] = []  # with a timeline: the audible segments of each row
        self.crop = tagger.crop or N_FRAMES
        self.sums: dict[int, tuple[torch.Tensor, int]] = {}  # file -> (sum of frames x probabilities, frames)
        self.seen: dict[int, int] = {}  # file -> windows added so far
        self.segments: dict[int, list[tuple]] = {}  # file -> its timeline's (Segment, probabilities or None)
        self.limit = 1  # the first batch is one window, then twice as many each time up to `size`: a quick first result

    def add(self, owner: int, features: np.ndarray | None, samples: int, silent: tuple[bool, ...] = ()) -> bool:
        """Queue one window (features None: silent; `silent`: its silent timeline segments); score the batch
        once it is full. Returns True when it scored."""
        window = self.seen.get(owner, 0)
        self.seen[owner] = window + 1
        audible = []
        if self.step is not None:  # silent segments: gaps in the timeline
            segments = segments_of(window, samples, self.step, self.crop)
            silent = silent or (features is None,) * len(segments)
            self.segments.setdefault(owner, []).extend((s, None) for s, quiet in zip(segments, silent) if quiet)
            audible = [s for s, quiet in zip(segments, silent) if not quiet]
        if features is None:
            return False
        self.to_score.append(audible)
        self.features[len(self.owners)] = features
        self.owners.append(owner)
        self.valid.append(valid_frames(samples, N_FRAMES))
        if len(self.owners) < self.limit:
            return False
        self.flush()
        return True

    def flush(self) -> None:
        """Score the queued windows."""
        if not self.owners:
            return
        t = self.tagger
        x = torch.from_numpy(self.features[: len(self.owners)]).to(t.device)
        v = torch.tensor(self.valid, device=t.device)
        before = torch.get_num_threads()
        if self.threads is not None:  # restored below: the caller's setting is not ours to keep
            torch.set_num_threads(self.threads)
        try:
            weighted = v.float()[:, None] * score_features(t.model, x, v, t.crop, t.n_crops)
            if self.step is not None:
                self._score_segments(x)
        finally:
            torch.set_num_threads(before)
        owners = torch.tensor(self.owners, device=t.device)
        for owner in dict.fromkeys(self.owners):
            rows = owners == owner
            total, frames = self.sums.get(owner, (0.0, 0))
            self.sums[owner] = (total + weighted[rows].sum(0), frames + int(v[rows].sum()))
        self.owners, self.valid, self.to_score = [], [], []
        self.limit = min(self.size, 2 * self.limit)

    @torch.no_grad()
    def _score_segments(self, x: torch.Tensor) -> None:
        """Score the timeline segments of the queued windows (features x on the model's device)."""
        crops, owners = [], []  # (row, start, length) of every crop; (owner, segment, its crops' indices)
        for row, (owner, segments) in enumerate(zip(self.owners, self.to_score)):
            for segment in segments:
                owners.append((owner, segment, range(len(crops), len(crops) + len(segment.crops))))
                crops.extend((row, s, n) for s, n in segment.crops)
        probabilities = torch.empty(len(crops), self.tagger.model.cfg.n_genres, device=x.device)
        by_length: dict[int, list[int]] = {}
        for i, (_, _, n) in enumerate(crops):
            by_length.setdefault(n, []).append(i)
        for n, indices in by_length.items():
            for chunk in range(0, len(indices), 64):  # bounded batches: a window has at most 30 s / step crops
                part = indices[chunk : chunk + 64]
                batch = torch.stack([x[crops[i][0], crops[i][1] : crops[i][1] + n] for i in part])
                lengths = torch.full((len(part),), n, device=x.device)
                probabilities[part] = torch.sigmoid(self.tagger.model(batch, lengths))
        for owner, segment, indices in owners:
            mean = probabilities[list(indices)].mean(0).cpu().numpy().astype(np.float64)
            self.segments.setdefault(owner, []).append((segment, mean))

    def pending(self, owner: int) -> bool:
        """Return True while windows of `owner` wait in the batch."""
        return owner in self.owners

    def pop(self, owner: int) -> np.ndarray | None:
        """Return the frame-weighted mean probabilities of `owner`'s windows (None if none) and forget them."""
        self.seen.pop(owner, None)
        total, frames = self.sums.pop(owner, (None, 0))
        return None if not frames else (total / frames).cpu().numpy()

    def pop_timeline(self, owner: int) -> Timeline | None:
        """Return `owner`'s timeline (None without a step) and forget it."""
        if self.step is None:
            return None
        return assemble(self.step, self.segments.pop(owner, []), self.tagger.model.cfg.n_genres)


class Tagger:
    """A trained genre tagger: `Tagger.load(path).predict(file_or_waveform)`."""

    def __init__(
        self,
        model_file: ModelFile,
        device: str | torch.device = "cpu",
        crop: int | None = CROP_FRAMES,
        n_crops: int = N_CROPS,
    ):
        self.file = model_file
        self.model = model_file.model.to(device).eval()
        self.genres = model_file.genres
        self.decision = Decision.of(model_file.genre_ids, model_file.genre_parents, model_file.thresholds)
        self.device = torch.device(device)
        self.crop, self.n_crops = crop, n_crops

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None, **options) -> Tagger:
        """Load the model file at `path` (a model.safetensors, or a run folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "model.safetensors"
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(ModelFile.load(path, device), device, **options)

    def predict(
        self, source: str | Path | np.ndarray, sample_rate: int = SAMPLE_RATE, timeline: float | None = None
    ) -> Prediction:
        """Return the genre probabilities of an audio file or a mono waveform at `sample_rate`.

        Silent audio gets no genres (NaN probabilities and a warning); a file shorter than
        featurize.MIN_SECONDS is an AudioError, as an unreadable one is. `timeline` (seconds):
        also the probabilities every that many seconds (Prediction.timeline).
        """
        step = None if timeline is None else check_step(timeline)
        level = _Level()
        if isinstance(source, np.ndarray):
            if source.ndim != 1 or len(source) == 0:
                raise GenreclfError("a waveform must be a non-empty 1-D array (mono)")
            if not np.isfinite(source).all():
                raise GenreclfError("the waveform holds NaN or infinite samples; clean it (np.nan_to_num) first")
            wave = audio.resample(source, sample_rate)
            pieces = (wave[s : s + N_SAMPLES] for s in range(0, len(wave), N_SAMPLES))
            windows = _audible(pieces, level, step, self.crop or N_FRAMES)
            name = "<waveform>"
        else:  # decoded window by window: memory stays at a few windows however long the file is
            windows, name = _file_windows(source, level, step, self.crop or N_FRAMES), str(source)
        batcher = _Batcher(self, WINDOWS_PER_BATCH, step=step)
        for features, samples, silent in windows:
            batcher.add(0, features, samples, silent)
        batcher.flush()
        return self._ended(name, batcher, 0, "", level.dbfs())

    def predict_many(
        self,
        paths: Iterable[str | Path],
        workers: int | None = None,
        windows_per_batch: int = WINDOWS_PER_BATCH,
        timeout: float = CLIP_TIMEOUT,
        timeline: float | None = None,
    ) -> Iterator[Prediction]:
        """Yield a Prediction for every audio file in `paths` (folders walked recursively) as soon as it is done.

        Results come in the order files finish. A file that cannot be tagged (unreadable, too short,
        its decoder crashed or gave no window for `timeout` seconds) yields a Prediction with `error`
        set and the others go on. `workers` decoder processes (None: one per core but one, which scores;
        0: decode in this process). The probabilities (and the `timeline`, seconds per segment) equal `predict(path)`'s.
        """
        step = None if timeline is None else check_step(timeline)
        files, errors = find_inputs(paths)
        nan = np.full(len(self.genres), np.nan)
        for source, error in errors:
            yield Prediction(source, self.genres, nan, self.decision, error=error)
        jobs = ((i, str(path), step, self.crop or N_FRAMES) for i, path in enumerate(files))
        # The model needs a core too: on 2 cores, 1 decoder and the scoring kept both busy (60 files: 3.7 s
        # against 4.4 s with 2 decoders, which also cost a second torch import).
        workers = min(max(1, default_workers() - 1) if workers is None else workers, len(files))
        if workers == 0:
            items = chain.from_iterable(map(_file_items, jobs))
        else:
            items = pool_imap(jobs, workers, _file_items, _failed_file, timeout, init=_worker_init)
            # A window (480 kB) does not fit in a pipe's buffer: without a reader, the decoders would wait
            # while the model scores a batch, and one core would idle.
            items = _read_ahead(items, PREFETCH_WINDOWS)
        # Cores busy decoding are not the model's: spinning threads waiting on them made scoring 3-10x slower.
        threads = max(1, torch.get_num_threads() - workers) if workers and self.device.type == "cpu" else None
        batcher = _Batcher(self, windows_per_batch, threads, step)
        ended = {}  # file -> (error, level) of the files that ended with windows still in the batch
        for item in items:
            if item[1] == _WINDOW:
                if batcher.add(*item[0:1], *item[2:]):  # scored: the files that ended are done
                    for i in list(ended):
                        yield self._ended(str(files[i]), batcher, i, *ended.pop(i))
                continue
            i, _, error, level, details = item
            if details:
                log.debug("%s: the decoders said: %s", files[i], details)
            if batcher.pending(i):  # its last windows are scored with the next batch
                ended[i] = (error, level)
            else:
                yield self._ended(str(files[i]), batcher, i, error, level)
        batcher.flush()
        for i in list(ended):
            yield self._ended(str(files[i]), batcher, i, *ended.pop(i))

    def _ended(self, source: str, batcher: _Batcher, i: int, error: str, level: float) -> Prediction:
        """The Prediction of file `i`, whose windows are all scored; none scored, or a silent whole: no genres."""
        probabilities, timeline = batcher.pop(i), batcher.pop_timeline(i)
        nan = np.full(len(self.genres), np.nan)
        if error:
            return Prediction(source, self.genres, nan, self.decision, error=error)
        if probabilities is None or level < audio.SILENCE_DBFS:
            warning = f"silent audio (RMS level {level:.0f} dBFS < {audio.SILENCE_DBFS:.0f} dBFS): not tagged"
            return Prediction(source, self.genres, nan, self.decision, warning=warning, timeline=timeline)
        return Prediction(source, self.genres, probabilities, self.decision, timeline=timeline)

    def probabilities(self, wave: np.ndarray, windows_per_batch: int = WINDOWS_PER_BATCH) -> np.ndarray:
        """Return genre probabilities of a mono 16-kHz waveform of any length: every window, silent or not."""
        batcher = _Batcher(self, windows_per_batch)  # the scoring of predict and predict_many
        for s in range(0, max(len(wave), 1), N_SAMPLES):
            window = wave[s : s + N_SAMPLES]
            batcher.add(0, log_mel(pad_or_trim(window)), len(window))
        batcher.flush()
        return batcher.pop(0)
