"""A file as a stream of 30-s windows: the work of prediction's decoder processes, without torch.

Decoders only decode, downmix, resample and measure loudness; they send each audible window's
16-kHz waveform and the parent computes the log-mel features of a whole batch of windows at once,
where the model runs. A decoder imports no torch, so it starts in a fraction of a second and gives
the scoring all of the memory and cores that the imports would take.
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
from genreclf.errors import GenreclfError, first_line
from genreclf.timeline import segments_of

WINDOW, END = "window", "end"  # the kinds of item decode_file yields


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
