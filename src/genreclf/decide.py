"""Decisions from probabilities: per-genre thresholds chosen on validation data, and applying them.

A genre is chosen for a track when its probability is >= the genre's threshold. Each genre's
threshold is the one that maximises its F1 on the validation tracks. A genre with fewer than
MIN_POSITIVES validation positives takes the global threshold instead: the one that maximises
F1 over all (track, genre) pairs pooled; and when the validation tracks hold no positive at
all, every genre takes FIXED_THRESHOLD. Pure numpy: `genreclf.calibrate` feeds it a model's
validation probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from genreclf.errors import GenreclfError

# With a handful of positives the F1-optimal cut just sits below those few tracks' scores: it is
# fit to them, not to the genre (1 positive gives a threshold that accepts that track and almost
# nothing else). The pooled threshold is estimated from every pair, and the probabilities of all
# genres share one scale (one loss, one positive weight for every genre), so it transfers.
MIN_POSITIVES = 10
FIXED_THRESHOLD = 0.5  # only when the validation tracks have no positive pair at all: nothing to fit
RULE = (
    "per genre, the threshold maximising F1 on the validation tracks (a genre is chosen when its "
    "probability is >= its threshold; of equal F1, the highest threshold; it lies midway between the "
    "lowest accepted and the highest rejected probability); a genre with fewer than {min_positives} "
    "validation positives takes the threshold maximising F1 over all (track, genre) pairs pooled; "
    f"with no validation positive at all, {FIXED_THRESHOLD}"
)


def f1_optimal_threshold(scores: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """Return (threshold, F1) maximising the F1 of `scores >= threshold`; (nan, nan) without positives.

    Of cuts with equal F1 the highest threshold wins (fewer claims for the same F1). The threshold
    lies midway between the lowest accepted score and the highest rejected one (or half the lowest
    score when every item is accepted), so that a new score near a validation score is not decided
    by rounding.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    targets = np.asarray(targets).ravel().astype(bool)
    if scores.shape != targets.shape:
        raise GenreclfError(f"{scores.size} scores for {targets.size} targets")
    n_pos = int(targets.sum())
    if n_pos == 0:
        return float("nan"), float("nan")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], targets[order]
    tp = np.cumsum(y)
    accepted = np.arange(1, len(s) + 1)
    cut = np.r_[s[1:] != s[:-1], True]  # a cut can only fall between distinct scores
    # F1 = 2 TP / (accepted + positives): integer ratios, so equal F1s are equal floats.
    f1 = np.where(cut, 2 * tp / (accepted + n_pos), -1.0)
    k = int(np.argmax(f1))  # the first maximum: the highest threshold
    below = s[k + 1] if k + 1 < len(s) else 0.0
    return float((s[k] + below) / 2), float(f1[k])


@dataclass(frozen=True, eq=False)
class Thresholds:
    """Per-genre decision thresholds and how each was chosen."""

    values: np.ndarray  # (genres,) float: choose a genre when its probability is >= this
    chosen_by: list[str]  # per genre: "genre" (its own F1 optimum), "global" (pooled) or "fixed"
    positives: np.ndarray  # (genres,) int: validation positives of each genre
    f1: np.ndarray  # (genres,) float: validation F1 of each genre at its threshold (nan without positives)
    global_threshold: float  # the pooled F1-optimal threshold (FIXED_THRESHOLD without any positive)
    min_positives: int  # genres with fewer validation positives take global_threshold

    def to_dict(self) -> dict:
        """Return the thresholds as JSON-ready values, with the rule in words."""
        return {
            "values": [float(v) for v in self.values],
            "chosen_by": list(self.chosen_by),
            "positives": [int(p) for p in self.positives],
            "f1": [None if np.isnan(f) else float(f) for f in self.f1],
            "global": float(self.global_threshold),
            "min_positives": int(self.min_positives),
            "rule": RULE.format(min_positives=self.min_positives),
        }


def choose_thresholds(probabilities: np.ndarray, targets: np.ndarray, min_positives: int = MIN_POSITIVES) -> Thresholds:
    """Return the per-genre thresholds (see RULE) for validation probabilities and 0/1 targets (tracks, genres)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    targets = np.asarray(targets)
    if probabilities.shape != targets.shape or probabilities.ndim != 2:
        raise GenreclfError(
            f"probabilities {probabilities.shape} and targets {targets.shape} must both be (tracks, genres)"
        )
    if len(probabilities) == 0:
        raise GenreclfError("no validation tracks to choose thresholds on")
    if not np.isfinite(probabilities).all():
        raise GenreclfError("probabilities contain NaN or infinity")
    if min_positives < 1:
        raise GenreclfError(f"min_positives must be >= 1, got {min_positives}")
    targets = targets.astype(bool)
    pooled, _ = f1_optimal_threshold(probabilities, targets)
    global_threshold, global_by = (FIXED_THRESHOLD, "fixed") if np.isnan(pooled) else (pooled, "global")
    positives = targets.sum(0)
    values = np.full(targets.shape[1], global_threshold)
    chosen_by = [global_by] * targets.shape[1]
    for g in np.flatnonzero(positives >= min_positives):
        values[g], _ = f1_optimal_threshold(probabilities[:, g], targets[:, g])
        chosen_by[g] = "genre"
    return Thresholds(
        values, chosen_by, positives, f1_at(probabilities, targets, values), global_threshold, min_positives
    )


def f1_at(probabilities: np.ndarray, targets: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Return each genre's F1 of `probabilities >= thresholds` (genres,); nan for a genre without positives."""
    chosen = np.asarray(probabilities) >= np.asarray(thresholds)[None, :]
    targets = np.asarray(targets).astype(bool)
    tp = (chosen & targets).sum(0)
    denominator = chosen.sum(0) + targets.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(targets.sum(0) > 0, 2 * tp / denominator, np.nan)


@dataclass(frozen=True, eq=False)
class Decision:
    """What a model needs to turn probabilities into chosen genres: its thresholds and its genre tree."""

    thresholds: np.ndarray | None = None  # (genres,) per-genre thresholds; None for a model not calibrated
    parents: np.ndarray | None = None  # (genres,) column of each genre's parent, -1 for a root; None if unknown

    @classmethod
    def of(cls, genre_ids: list[int], genre_parents: list[int], thresholds: dict | None) -> Decision:
        """Return the Decision of a model file's genre ids, parent ids ([] if unknown) and stored thresholds."""
        values = None if thresholds is None else np.asarray(thresholds["values"], dtype=np.float64)
        parents = None
        if len(genre_parents):
            column = {int(g): c for c, g in enumerate(genre_ids)}
            parents = np.array([column.get(int(p), -1) for p in genre_parents], dtype=np.int64)
        return cls(values, parents)

    def chosen(
        self, probabilities: np.ndarray, threshold: float | None = None, with_parents: bool = False
    ) -> list[int]:
        """Return the columns whose probability is >= its threshold (or `threshold`), most probable first.

        with_parents appends each chosen genre's ancestors not chosen already (nearest first).
        """
        if threshold is None and self.thresholds is None:
            raise GenreclfError(
                "this model file has no per-genre thresholds (it predates them): run "
                "`genreclf calibrate RUN --store STORE` once, or give a global threshold (--threshold)"
            )
        if with_parents and self.parents is None:
            raise GenreclfError(
                "this model file does not store the genre tree: run `genreclf calibrate RUN --store STORE` "
                "once to add it (and per-genre thresholds)"
            )
        probabilities = np.asarray(probabilities)
        limit = self.thresholds if threshold is None else threshold
        order = np.argsort(-probabilities, kind="stable")
        columns = [int(c) for c in order if probabilities[c] >= np.broadcast_to(limit, probabilities.shape)[c]]
        if with_parents:
            for c in list(columns):
                parent = int(self.parents[c])
                while parent >= 0 and parent not in columns:
                    columns.append(parent)
                    parent = int(self.parents[parent])
        return columns
