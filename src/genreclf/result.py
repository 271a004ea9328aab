"""What tagging gives for one input: its genre probabilities, the genres chosen, a timeline, or why not.

Plain numpy (no torch): the command line reads its defaults here before torch is imported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from genreclf.decide import Decision
from genreclf.timeline import Timeline, top_genres


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
