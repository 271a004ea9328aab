"""Genres over time: a track's probabilities every `step` seconds, and their picture.

Segment k covers [k * step, (k + 1) * step) seconds; the last one ends with the audio (less
than half a second left at the end is folded into it); the step divides 30 s, so every
segment lies in one 30-s window. It is scored on that window's
features (normalised as the training clips were): one crop of the model's crop length centred
on the segment, or, for a segment longer than a crop, evenly spaced crops covering it, averaged.
A silent segment (RMS below audio.SILENCE_DBFS, like a silent window) has no probabilities (NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from genreclf.audio import CLIP_SECONDS, HOP_LENGTH, N_FRAMES, SAMPLE_RATE
from genreclf.crops import crop_starts, valid_frames
from genreclf.errors import GenreclfError

FRAMES_PER_SECOND = SAMPLE_RATE / HOP_LENGTH  # 31.25
DEFAULT_STEP = 10.0  # seconds, as `--plot` uses when no --timeline is given
MIN_STEP = 1.0  # seconds: a segment must hold a few dozen frames for the model to say anything
MIN_TAIL = 0.5  # seconds: less audio than this after the last whole segment is folded into it


@dataclass(frozen=True)
class Timeline:
    """Genre probabilities per segment: segment k covers [starts[k], ends[k]) seconds."""

    step: float
    starts: np.ndarray  # (segments,) seconds, ascending
    ends: np.ndarray  # (segments,) seconds: start + step, or less for the last one
    probabilities: np.ndarray  # (segments, genres); rows of NaN: silent segments

    def top(self, k: int, genres: list[str]) -> list[list[tuple[str, float]]]:
        """Return each segment's k most probable (genre, probability) pairs (none for a silent segment)."""
        return [top_genres(row, genres, k) for row in self.probabilities]

    def record(self, genres: list[str], k: int) -> dict:
        """Return the timeline as JSON: {"step", "segments": [{"start", "end", "genres", "silent"?}]}, k genres each."""
        segments = [
            {
                "start": round(float(start), 3),
                "end": round(float(end), 3),
                "genres": [{"genre": g, "probability": round(p, 4)} for g, p in top],
            }
            | ({} if top else {"silent": True})
            for start, end, top in zip(self.starts, self.ends, self.top(k, genres))
        ]
        return {"step": self.step, "segments": segments}


def top_genres(probabilities: np.ndarray, genres: list[str], k: int) -> list[tuple[str, float]]:
    """Return the k most probable (genre, probability) pairs, most probable first; none where NaN (not scored)."""
    order = np.argsort(-np.nan_to_num(probabilities, nan=-1.0), kind="stable")[:k]
    return [(genres[i], float(probabilities[i])) for i in order if not np.isnan(probabilities[i])]


def check_step(step: float) -> float:
    """Return `step` (seconds) if usable for a timeline: >= MIN_STEP and dividing 30 s; GenreclfError otherwise."""
    windows = CLIP_SECONDS / step if math.isfinite(step) and step > 0 else 0.0
    if step < MIN_STEP or abs(windows - round(windows)) > 1e-9:
        raise GenreclfError(
            f"a timeline step must be at least {MIN_STEP:g} s and divide {CLIP_SECONDS} s (e.g. 5, 10 or 15), "
            f"got {step:g}"
        )
    return float(step)


@dataclass(frozen=True)
class Segment:
    """A timeline segment within its 30-s window; frames counted from the window's start."""

    start: float  # seconds from the start of the track
    end: float  # likewise: start + step, or the end of the audio
    frames: tuple[int, int]  # [first, last + 1) frames it covers
    crops: list[tuple[int, int]]  # (start frame, length) of the crops that score it

    def samples(self) -> slice:
        """The window's samples it covers."""
        return slice(self.frames[0] * HOP_LENGTH, self.frames[1] * HOP_LENGTH)


def segments_of(window: int, samples: int, step: float, crop: int) -> list[Segment]:
    """Return the segments of 30-s window `window` (its index in the track), which holds `samples` samples."""
    t0 = window * CLIP_SECONDS
    valid = valid_frames(samples, N_FRAMES)
    end = t0 + min(samples / SAMPLE_RATE, CLIP_SECONDS)
    length = min(crop, valid)
    n = max(1, math.ceil((end - t0) / step - MIN_TAIL / step))  # the segments that start with MIN_TAIL s still left
    segments = []
    for k in range(round(t0 / step), round(t0 / step) + n):
        last = k == round(t0 / step) + n - 1
        a = round((k * step - t0) * FRAMES_PER_SECOND)
        b = valid if last else min(round(((k + 1) * step - t0) * FRAMES_PER_SECOND), valid)
        if b - a <= length:  # one crop centred on the segment, inside the window
            start = min(max(round((a + b - length) / 2), 0), valid - length)
            crops = [(start, length)]
        else:  # evenly spaced crops covering it
            crops = [(a + s, length) for s in crop_starts(b - a, length, math.ceil((b - a) / length))]
        segments.append(Segment(k * step, end if last else (k + 1) * step, (a, b), crops))
    return segments


def assemble(step: float, scored: list[tuple[Segment, np.ndarray | None]], n_genres: int) -> Timeline:
    """Return the Timeline of (segment, probabilities or None for silent) pairs given in any order."""
    scored = sorted(scored, key=lambda s: s[0].start)
    starts = np.array([s.start for s, _ in scored], dtype=np.float64)
    ends = np.array([s.end for s, _ in scored], dtype=np.float64)
    probabilities = np.full((len(scored), n_genres), np.nan)
    for row, (_, p) in enumerate(scored):
        if p is not None:
            probabilities[row] = p
    return Timeline(step, starts, ends, probabilities)


def hms(seconds: float) -> str:
    """Return m:ss for a time in seconds."""
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def plot(timeline: Timeline, genres: list[str], overall: np.ndarray, path: Path, title: str, n: int = 5) -> Path:
    """Draw `n` genres against time: each segment's most probable one (in order of time), then the highest
    peaks; write a PNG at `path`.

    Not the track's top genres (`overall`, shown in the legend): in a mix, the genre of one part is the
    point even when the track as a whole is something else.
    """
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from genreclf.atomic import atomic_save_png

    fig = Figure(figsize=(9, 3.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    edges = np.append(timeline.starts, timeline.ends[-1:])  # segments are contiguous
    scored = timeline.probabilities[~np.isnan(timeline.probabilities).all(1)]
    leaders = list(dict.fromkeys(int(c) for c in scored.argmax(1)))  # each segment's top genre, by time
    peaks = [int(c) for c in np.argsort(-scored.max(0), kind="stable")] if len(scored) else []
    for column in list(dict.fromkeys(leaders + peaks))[:n]:
        label = f"{genres[column]} (track: {overall[column]:.2f})"
        ax.stairs(timeline.probabilities[:, column], edges, label=label, lw=1.8, baseline=None)
    silent = np.isnan(timeline.probabilities).all(1)
    for k, (start, end) in enumerate(zip(timeline.starts[silent], timeline.ends[silent])):
        ax.axvspan(start, end, color="0.88", lw=0, label="silent" if k == 0 else None)
    ax.set_ylim(0, 1)
    ax.set_xlim(0, edges[-1] if len(edges) else 1)
    ax.set_xlabel(f"time (min:s), {timeline.step:g}-s segments")
    ax.set_ylabel("probability")
    ax.xaxis.set_major_formatter(lambda x, _: hms(x))
    ax.set_title("\n".join(textwrap.wrap(title, 95)), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="segments' top genres", title_fontsize=8)
    fig.tight_layout()
    atomic_save_png(path, fig)
    return path
