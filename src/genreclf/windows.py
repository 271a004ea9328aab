"""Files as streams of 30-s windows, decoded by worker processes: prediction's input, without torch.

Decoders only decode, downmix, resample and measure loudness; they send each audible window's
16-kHz waveform, and the process that runs the model computes its log-mel features. Nothing here
imports torch: a decoder starts in a fraction of a second, and `genreclf predict` starts its
decoders (`Decoding`) before it imports torch and loads the model, so that the first windows are
decoded in the second that takes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from genreclf import audio
from genreclf.audio import MIN_SECONDS, N_SAMPLES, SAMPLE_RATE
from genreclf.crops import CROP_FRAMES
from genreclf.errors import GenreclfError, first_line
from genreclf.pool import CLIP_TIMEOUT, Pool, ReadAhead, default_workers, pool_imap
from genreclf.timeline import segments_of

WINDOW, END = "window", "end"  # the kinds of item decode_file yields
# Windows decoded ahead of the model (1.9 MB each): enough for the decoders to work through the second in
# which `genreclf predict` imports torch and loads its model, and to go on while the model scores a batch.
READ_AHEAD = 32


@dataclass
class Level:
    """Samples seen and their energy: the RMS level of a file decoded window by window."""

    samples: int = 0
    energy: float = 0.0

    def dbfs(self) -> float:
        """The RMS level in dBFS, as audio.rms_dbfs of the whole waveform (to ~1e-6 relative)."""
        power = self.energy / self.samples if self.samples else 0.0
        return 10.0 * math.log10(power) if power > 0 else float("-inf")


def audible_windows(
    windows: Iterable[np.ndarray], level: Level, step: float | None, crop: int
) -> Iterator[tuple[np.ndarray | None, int, tuple[bool, ...]]]:
    """Yield (the window's waveform, or None if silent; its samples; its silent timeline segments) per window.

    With a timeline `step`, one flag per segment of the window (True: silent), else ().
    """
    for index, window in enumerate(windows):
        level.samples += len(window)
        level.energy += float(np.dot(window, window))
        if audio.is_silent(window):
            yield None, len(window), ()
            continue
        segments = () if step is None else segments_of(index, len(window), step, crop)
        yield window, len(window), tuple(audio.is_silent(window[s.samples()]) for s in segments)


def file_windows(
    path: str | Path, level: Level, step: float | None, crop: int, min_seconds: float = MIN_SECONDS
) -> Iterator[tuple]:
    """Yield the windows of the file at `path` (see audible_windows); AudioError when it is too short."""
    windows = audio.stream(path, block_seconds=N_SAMPLES / SAMPLE_RATE)
    first = next(windows, np.zeros(0, np.float32))  # 30 s unless the whole file is shorter
    if len(first) < min_seconds * SAMPLE_RATE:
        raise audio.AudioError(f"{path}: too short ({len(first) / SAMPLE_RATE:.2f} s < {min_seconds} s)")
    yield from audible_windows(chain([first], windows), level, step, crop)


def decode_file(job: tuple[int, str, float | None, int]) -> Iterator[tuple]:
    """A decoder's job: yield (i, WINDOW, waveform or None, samples, silent segments) per window of file i,
    then (i, END, error, dBFS, details)."""
    i, path, step, crop = job
    level = Level()
    try:
        for wave, samples, silent in file_windows(path, level, step, crop):
            yield i, WINDOW, wave, samples, silent
    except GenreclfError as e:  # the decoders' words travel with it: a worker's own logging is not set up
        yield i, END, str(e), 0.0, getattr(e, "details", "")
        return
    except Exception as e:  # a decoder bug on one odd file must not stop the others
        yield i, END, f"{path}: unexpected {type(e).__name__}: {first_line(e)}", 0.0, str(e)
        return
    yield i, END, "", level.dbfs(), ""


def failed_file(job: tuple[int, str, float | None, int], reason: str) -> tuple:
    """The END item of a file whose decoder crashed or hung."""
    return job[0], END, f"{job[1]}: {reason}", 0.0, ""


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


def default_decoders() -> int:
    """One decoder process per core but one, which the model uses (at least one)."""
    return max(1, default_workers() - 1)


class Decoding:
    """`files` being decoded (decode_file's items) by `workers` processes, from construction on.

    Iterate once for the items; close() stops the decoders (iterating to the end does too). workers:
    None for default_decoders(), 0 to decode in the iterating thread instead. step: the timeline's
    seconds per segment (None: no timeline); crop: the frames of the model's crops.
    """

    def __init__(
        self,
        files: Iterable[str | Path],
        workers: int | None = None,
        step: float | None = None,
        crop: int = CROP_FRAMES,
        timeout: float = CLIP_TIMEOUT,
        read_ahead: int = READ_AHEAD,
    ):
        self.files = [Path(f) for f in files]
        self.step, self.crop = step, crop
        self.workers = min(default_decoders() if workers is None else workers, len(self.files))
        jobs = ((i, str(path), step, crop) for i, path in enumerate(self.files))
        if self.workers == 0:
            self._items: Iterable = chain.from_iterable(map(decode_file, jobs))
        else:  # started here (this thread's Ctrl-C safety); read ahead: a window does not fit a pipe's buffer
            pool = Pool(self.workers, decode_file, None)
            items = pool_imap(jobs, self.workers, decode_file, failed_file, timeout, pool=pool)
            self._items = ReadAhead(items, read_ahead)

    def __iter__(self) -> Iterator[tuple]:
        return iter(self._items)

    def close(self) -> None:
        """Stop the decoders (those not yet done)."""
        if isinstance(self._items, ReadAhead):
            self._items.close()

    def __enter__(self) -> Decoding:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
