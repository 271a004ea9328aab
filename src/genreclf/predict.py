"""Tag audio with a trained model: files, folders or waveforms of any length.

A track is cut into consecutive 30-s windows (the clips the model was trained on, each
normalised on its own as in training); each window is scored by averaging the model's
probabilities over evenly spaced crops; windows are averaged weighted by their real frames. Silent
windows (RMS below audio.SILENCE_DBFS) are skipped, so a quiet intro does not dilute the music; a
silent file gets no genres at all.

`Tagger.predict_many` tags many files at once: decoder processes (genreclf.windows, no torch)
decode each file as a stream of 30-s windows and send each audible window's 16-kHz waveform
(1.9 MB) as soon as it is ready; the parent computes the log-mel features of windows from any
files together in batches, scores them, and yields each file's result as soon as its last window
is scored. The pipes are the backpressure (a worker waits
until the parent has read what it sent), so memory stays at a batch of windows plus a few in each
pipe, whatever the number of files or their length.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from genreclf import audio
from genreclf.audio import N_FRAMES, N_SAMPLES, SAMPLE_RATE
from genreclf.crops import CROP_FRAMES, N_CROPS, crop_starts, valid_frames
from genreclf.decide import Decision
from genreclf.errors import GenreclfError
from genreclf.fastops import keep_freed_memory
from genreclf.hierarchy import GenreTree, make_consistent
from genreclf.mel import log_mel_batch
from genreclf.modelfile import ModelFile
from genreclf.pool import CLIP_TIMEOUT
from genreclf.result import Prediction
from genreclf.timeline import Timeline, assemble, check_step, segments_of
from genreclf.windows import WINDOW, Decoding, Level, audible_windows, file_windows, find_inputs

log = logging.getLogger(__name__)

WINDOWS_PER_BATCH = 8  # 30-s windows scored together (from one file or several)
MODEL_BATCH = 64  # crops per call of the model (8 crops x 8 windows)


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
    means = torch.empty(len(features), model.cfg.n_genres, device=features.device)
    # Tracks of equal valid length share crop positions: their crops go through the model together, up to
    # MODEL_BATCH at a time (on one CPU thread a GRU ran 1.5x faster per crop in batches of 64 than of 8).
    for n in torch.unique(valid).tolist():
        rows = torch.nonzero(valid == n).flatten()
        starts = crop_starts(int(n), crop, n_crops)
        length = min(crop, int(n))
        x = torch.cat([features[rows, start : start + length] for start in starts])  # crop-major
        lengths = torch.full((MODEL_BATCH,), length, device=features.device)
        logits = torch.cat([model(part, lengths[: len(part)]) for part in x.split(MODEL_BATCH)])
        means[rows] = torch.sigmoid(logits).view(len(starts), len(rows), -1).mean(0)
    return means


class _Batcher:
    """Windows of many files scored together in batches; per-file frame-weighted sums of probabilities.

    With a timeline `step` (seconds), also each window's segments (see genreclf.timeline), per file.
    """

    def __init__(self, tagger: Tagger, size: int, threads: int | None = None, step: float | None = None):
        self.tagger, self.size, self.step = tagger, size, step
        self.threads = threads  # torch threads while scoring (None: as they are)
        self.waves = np.zeros((size, N_SAMPLES), np.float32)  # one batch buffer: memory bounded
        self.owners: list[int] = []  # the file of each row
        self.valid: list[int] = []
        self.to_score: list[list] = []  # with a timeline: the audible segments of each row
        self.crop = tagger.crop or N_FRAMES
        self.sums: dict[int, tuple[torch.Tensor, int]] = {}  # file -> (sum of frames x probabilities, frames)
        self.seen: dict[int, int] = {}  # file -> windows added so far
        self.segments: dict[int, list[tuple]] = {}  # file -> its timeline's (Segment, probabilities or None)
        self.limit = 1  # the first batch is one window, then twice as many each time up to `size`: a quick first result

    def add(self, owner: int, wave: np.ndarray | None, samples: int, silent: tuple[bool, ...] = ()) -> bool:
        """Queue one window (its waveform, at most 30 s; None: silent; `silent`: its silent timeline segments);
        score the batch once it is full. Returns True when it scored."""
        window = self.seen.get(owner, 0)
        self.seen[owner] = window + 1
        audible = []
        if self.step is not None:  # silent segments: gaps in the timeline
            segments = segments_of(window, samples, self.step, self.crop)
            silent = silent or (wave is None,) * len(segments)
            self.segments.setdefault(owner, []).extend((s, None) for s, quiet in zip(segments, silent) if quiet)
            audible = [s for s, quiet in zip(segments, silent) if not quiet]
        if wave is None:
            return False
        self.to_score.append(audible)
        row = self.waves[len(self.owners)]
        row[: len(wave)] = wave
        row[len(wave) :] = 0.0  # zero-padded to 30 s, as featurize pads a clip
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
        v = torch.tensor(self.valid, device=t.device)
        before = torch.get_num_threads()
        if self.threads is not None:  # restored below: the caller's setting is not ours to keep
            torch.set_num_threads(self.threads)
        try:
            x = self._features()
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

    def _features(self) -> torch.Tensor:
        """Return the log-mel features (windows, frames, mels) of the queued windows, on the model's device."""
        waves = torch.from_numpy(self.waves[: len(self.owners)]).to(self.tagger.device)
        if waves.device.type != "cpu":
            return log_mel_batch(waves)
        # On a CPU one window at a time (one thread: 4 ms a window, against 5 in batches of 8 and 10 when a
        # batch's spectra, 8 MB a window, are fresh memory to fault in).
        return torch.cat([log_mel_batch(wave[None]) for wave in waves])

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
    """A trained genre tagger: `Tagger.load(path).predict(file_or_waveform)`.

    consistent=True makes every probability it gives (per file and per timeline segment) hierarchy-consistent:
    each genre raised to its most probable descendant's (genreclf.hierarchy.CONSISTENCY_RULE).
    """

    def __init__(
        self,
        model_file: ModelFile,
        device: str | torch.device = "cpu",
        crop: int | None = CROP_FRAMES,
        n_crops: int = N_CROPS,
        consistent: bool = False,
    ):
        self.file = model_file
        self.model = model_file.model.to(device).eval()
        self.genres = model_file.genres
        self.decision = Decision.of(model_file.genre_ids, model_file.genre_parents, model_file.thresholds)
        self.device = torch.device(device)
        self.crop, self.n_crops = crop, n_crops
        self.consistent = consistent
        self.tree = None  # the genre tree when consistent
        if consistent:
            if not model_file.genre_parents:
                raise GenreclfError(
                    "this model file does not store the genre tree that consistent scores need: run "
                    "`genreclf calibrate RUN --store STORE` once to add it"
                )
            self.tree = GenreTree.from_ids(model_file.genre_ids, model_file.genre_parents)

    def _consistent(self, probabilities: np.ndarray) -> np.ndarray:
        """Return (..., genres) probabilities made consistent when asked for, else as they are."""
        if self.tree is None:
            return probabilities
        return make_consistent(np.atleast_2d(probabilities), self.tree).reshape(probabilities.shape)

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
        level = Level()
        if isinstance(source, np.ndarray):
            if source.ndim != 1 or len(source) == 0:
                raise GenreclfError("a waveform must be a non-empty 1-D array (mono)")
            if not np.isfinite(source).all():
                raise GenreclfError("the waveform holds NaN or infinite samples; clean it (np.nan_to_num) first")
            wave = audio.resample(source, sample_rate)
            pieces = (wave[s : s + N_SAMPLES] for s in range(0, len(wave), N_SAMPLES))
            windows = audible_windows(pieces, level, step, self.crop or N_FRAMES)
            name = "<waveform>"
        else:  # decoded window by window: memory stays at a few windows however long the file is
            windows, name = file_windows(source, level, step, self.crop or N_FRAMES), str(source)
        batcher = _Batcher(self, WINDOWS_PER_BATCH, step=step)
        for window, samples, silent in windows:
            batcher.add(0, window, samples, silent)
        batcher.flush()
        return self._ended(name, batcher, 0, "", level.dbfs())

    def predict_many(
        self,
        paths: Iterable[str | Path] | Decoding,
        workers: int | None = None,
        windows_per_batch: int = WINDOWS_PER_BATCH,
        timeout: float = CLIP_TIMEOUT,
        timeline: float | None = None,
    ) -> Iterator[Prediction]:
        """Yield a Prediction for every audio file in `paths` (folders walked recursively) as soon as it is done.

        Results come in the order files finish. A file that cannot be tagged (unreadable, too short,
        its decoder crashed or gave no window for `timeout` seconds) yields a Prediction with `error`
        set and the others go on. `workers` decoder processes (None: one per core but one, which scores;
        0: decode in this process). The probabilities (and the `timeline`, seconds per segment) equal
        `predict(path)`'s. `paths` may be a Decoding already started (then its workers and timeout hold),
        made with this timeline's step and this tagger's crop.
        """
        step = None if timeline is None else check_step(timeline)
        crop = self.crop or N_FRAMES
        if isinstance(paths, Decoding):
            decoding = paths
            if (decoding.step, decoding.crop) != (step, crop):
                raise ValueError(
                    f"the Decoding has step {decoding.step} and crop {decoding.crop}, this call {step} and {crop}"
                )
        else:
            files, errors = find_inputs(paths)
            nan = np.full(len(self.genres), np.nan)
            for source, error in errors:
                yield Prediction(source, self.genres, nan, self.decision, error=error)
            decoding = Decoding(files, workers, step, crop, timeout)
        # Cores busy decoding are not the model's: spinning threads waiting on them made scoring 3-10x slower.
        cpu = self.device.type == "cpu"
        threads = max(1, torch.get_num_threads() - decoding.workers) if decoding.workers and cpu else None
        batcher = _Batcher(self, windows_per_batch, threads, step)
        # Every batch needs the same few hundred MB of scratch: kept, not given back and faulted in again
        # (page faults cost as much as the GRU's arithmetic in batches of 64 crops).
        with decoding, keep_freed_memory() if cpu else contextlib.nullcontext():
            yield from self._results(decoding, batcher)

    def _results(self, decoding: Decoding, batcher: _Batcher) -> Iterator[Prediction]:
        """Score the decoders' items (see genreclf.windows); yield each file's Prediction when done."""
        files = decoding.files
        ended = {}  # file -> (error, level) of the files that ended with windows still in the batch
        for item in decoding:
            if item[1] == WINDOW:
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
        if timeline is not None and self.tree is not None:
            timeline = replace(timeline, probabilities=self._consistent(timeline.probabilities))
        nan = np.full(len(self.genres), np.nan)
        if error:
            return Prediction(source, self.genres, nan, self.decision, error=error)
        if probabilities is None or level < audio.SILENCE_DBFS:
            warning = f"silent audio (RMS level {level:.0f} dBFS < {audio.SILENCE_DBFS:.0f} dBFS): not tagged"
            return Prediction(source, self.genres, nan, self.decision, warning=warning, timeline=timeline)
        return Prediction(source, self.genres, self._consistent(probabilities), self.decision, timeline=timeline)

    def probabilities(self, wave: np.ndarray, windows_per_batch: int = WINDOWS_PER_BATCH) -> np.ndarray:
        """Return genre probabilities of a mono 16-kHz waveform of any length: every window, silent or not."""
        batcher = _Batcher(self, windows_per_batch)  # the scoring of predict and predict_many
        for s in range(0, max(len(wave), 1), N_SAMPLES):
            window = wave[s : s + N_SAMPLES]
            batcher.add(0, window, len(window))
        batcher.flush()
        return self._consistent(batcher.pop(0))
