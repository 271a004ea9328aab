"""Tagging metrics (AP, ROC-AUC), chance levels, bootstrap intervals and crop positions.

Pure numpy. Average precision and ROC-AUC equal scikit-learn's
``average_precision_score`` and ``roc_auc_score`` (ties included) to ~1e-12, but
are computed from one sort per genre, so that bootstrap resamples (which are
integer sample weights on the tracks) need no re-sort.

Naming: the reference study calls its number the "micro-average" AUC-PR, but
computes ``average_precision_score(average="weighted")``: per-genre AP weighted
by each genre's number of positives. Here that is ``ap_weighted``; ``ap_micro``
is the true micro average (AP of all (track, genre) pairs ranked together).
"""

from __future__ import annotations

from collections.abc import Callable
from statistics import NormalDist

import numpy as np

from genreclf.errors import GenreclfError

Metric = Callable[[np.ndarray, np.ndarray], float]


SUMMARY = ("ap_weighted", "ap_micro", "ap_macro", "roc_auc_macro")
DESCRIPTIONS = {
    "ap_weighted": 'per-genre AP weighted by positives (the reference\'s "micro-average")',
    "ap_micro": "micro-averaged AP over all (track, genre) pairs",
    "ap_macro": "mean AP over the genres with a positive in the test set",
    "roc_auc_macro": "mean ROC-AUC over the genres with a positive and a negative in the test set",
}

MACRO_GENRE_SET = (
    "ap_macro averages the n_genres_ap genres with a positive in the full test set, roc_auc_macro "
    "the n_genres_roc_auc with a positive and a negative; every bootstrap resample averages the same "
    "genres, a genre without positives (or negatives) in a resample keeping its full-set value"
)


def _check(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.shape != y_score.shape or y_true.ndim not in (1, 2):
        raise GenreclfError(
            f"labels {y_true.shape} and scores {y_score.shape} must have the same shape "
            "(tracks,) or (tracks, genres); check that the model and the labels use the same genres"
        )
    if not np.isin(y_true, (0, 1)).all():
        raise GenreclfError("labels must be 0/1 (multi-hot genre matrix)")
    if not np.isfinite(y_score).all():
        raise GenreclfError("scores contain NaN or infinity")
    return y_true.astype(bool), y_score


class _Ranked:
    """Columns of scores sorted once; AP / ROC-AUC for any integer track weights."""

    def __init__(self, y_true: np.ndarray, y_score: np.ndarray, track: np.ndarray | None = None):
        # y_true, y_score: (m, C) items x columns; track: (m,) track of each item (default: itself).
        m, n_cols = y_score.shape
        order = np.argsort(-y_score, axis=0, kind="stable").T  # (C, m), descending score
        s = np.take_along_axis(y_score.T, order, axis=1)
        y = np.take_along_axis(y_true.T, order, axis=1)
        self.rows = order if track is None else track[order]  # (C, m) track index per position
        self.n_cols, self.m = n_cols, m
        # First and last sorted position of each position's tie group (sklearn thresholds).
        pos = np.broadcast_to(np.arange(m), (n_cols, m))
        new = np.ones((n_cols, m), dtype=bool)
        new[:, 1:] = s[:, 1:] != s[:, :-1]
        last = np.ones((n_cols, m), dtype=bool)
        last[:, :-1] = new[:, 1:]
        start = np.maximum.accumulate(np.where(new, pos, 0), axis=1)
        end = np.minimum.accumulate(np.where(last, pos, m)[:, ::-1], axis=1)[:, ::-1]
        # Only positives contribute to either metric: keep them as one flat list.
        g, p = np.nonzero(y)
        self.col = g  # column of each positive
        self.pos_track = self.rows[g, p]
        key = g * m + p
        self.first = np.searchsorted(key, g * m + start[g, p], side="left")
        self.last = np.searchsorted(key, g * m + end[g, p], side="right") - 1
        self.gstart = np.searchsorted(g, np.arange(n_cols + 1))
        self.flat_start = g * (m + 1) + start[g, p]
        self.flat_end = g * (m + 1) + end[g, p] + 1

    def _counts(self, w: np.ndarray) -> tuple[np.ndarray, ...]:
        tot = np.zeros((self.n_cols, self.m + 1), dtype=np.int64)
        np.cumsum(w[self.rows], axis=1, out=tot[:, 1:])
        total = tot[:, -1]
        tot = tot.ravel()
        pw = w[self.pos_track]
        cpw = np.zeros(pw.size + 1, dtype=np.int64)
        np.cumsum(pw, out=cpw[1:])
        base = cpw[self.gstart[self.col]]
        tp_end = cpw[self.last + 1] - base
        tp_before = cpw[self.first] - base
        n_pos = np.diff(cpw[self.gstart])
        return pw, tp_end, tp_before, tot[self.flat_end], tot[self.flat_start], n_pos, total

    def support(self, w: np.ndarray) -> np.ndarray:
        """Weighted number of positives per column."""
        cpw = np.zeros(self.pos_track.size + 1, dtype=np.int64)
        np.cumsum(w[self.pos_track], out=cpw[1:])
        return np.diff(cpw[self.gstart])

    def ap(self, w: np.ndarray) -> np.ndarray:
        """AP per column for track weights w (nan where no positives)."""
        _, tp_end, tp_before, tot_end, _, n_pos, _ = self._counts(w)
        # sklearn's step integral: sum over tie groups of recall step x precision.
        # Each group is visited once, at its last positive; empty groups add 0.
        group_last = self.last == np.arange(self.last.size)
        pos = np.maximum(n_pos, 1)[self.col]
        step = tp_end / pos - tp_before / pos  # as sklearn: a difference of recalls
        contrib = np.where(group_last, step * (tp_end / np.maximum(tot_end, 1)), 0.0)
        s = np.bincount(self.col, weights=contrib, minlength=self.n_cols)
        return np.where(n_pos > 0, s, np.nan)

    def roc_auc(self, w: np.ndarray) -> np.ndarray:
        """ROC-AUC per column for track weights w (nan without positives or negatives)."""
        pw, tp_end, tp_before, tot_end, tot_before, n_pos, total = self._counts(w)
        n_neg = total - n_pos
        neg_ge = tot_end - tp_end  # negatives scored >= this positive
        neg_gt = tot_before - tp_before  # negatives scored > this positive
        contrib = pw * ((n_neg[self.col] - neg_ge) + 0.5 * (neg_ge - neg_gt))
        s = np.bincount(self.col, weights=contrib, minlength=self.n_cols)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where((n_pos > 0) & (n_neg > 0), s / (n_pos * n_neg), np.nan)


def _ranked_micro(y_true: np.ndarray, y_score: np.ndarray) -> _Ranked:
    n, n_genres = y_true.shape
    track = np.repeat(np.arange(n), n_genres)
    return _Ranked(y_true.reshape(-1, 1), y_score.reshape(-1, 1), track)


def _as_2d(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    y_true, y_score = _check(y_true, y_score)
    one = y_true.ndim == 1
    return (y_true[:, None], y_score[:, None], one) if one else (y_true, y_score, one)


def average_precision(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray | float:
    """AP of each column (or of a 1-D input) as sklearn computes it; nan without positives."""
    y_true, y_score, one = _as_2d(y_true, y_score)
    ap = _Ranked(y_true, y_score).ap(np.ones(len(y_true), dtype=np.int64))
    return float(ap[0]) if one else ap


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray | float:
    """ROC-AUC of each column (or of a 1-D input), ties count 1/2; nan if a class is absent."""
    y_true, y_score, one = _as_2d(y_true, y_score)
    auc = _Ranked(y_true, y_score).roc_auc(np.ones(len(y_true), dtype=np.int64))
    return float(auc[0]) if one else auc


def _macro(per_genre: np.ndarray) -> float:
    ok = ~np.isnan(per_genre)
    return float(per_genre[ok].mean()) if ok.any() else float("nan")


def _weighted(ap: np.ndarray, support: np.ndarray) -> float:
    ok = support > 0
    return float(np.average(ap[ok], weights=support[ok])) if ok.any() else float("nan")


def ap_macro(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Mean AP over the genres that have at least one positive."""
    return _macro(average_precision(*_as_2d(y_true, y_score)[:2]))


def ap_weighted(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Per-genre AP weighted by positives (the reference's "micro-average" AUC-PR)."""
    y_true, y_score, _ = _as_2d(y_true, y_score)
    return _weighted(average_precision(y_true, y_score), y_true.sum(axis=0))


def ap_micro(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """AP of all (track, genre) pairs ranked together (sklearn average="micro")."""
    y_true, y_score, _ = _as_2d(y_true, y_score)
    return float(_ranked_micro(y_true, y_score).ap(np.ones(len(y_true), dtype=np.int64))[0])


def roc_auc_macro(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Mean ROC-AUC over the genres with at least one positive and one negative."""
    return _macro(roc_auc(*_as_2d(y_true, y_score)[:2]))


def random_ranking_ap(n: int | np.ndarray, n_pos: int | np.ndarray) -> np.ndarray:
    """Expected AP of a uniformly random ranking of n items with n_pos positives."""
    n, n_pos = np.broadcast_arrays(np.asarray(n, dtype=np.int64), np.asarray(n_pos, dtype=np.float64))
    sizes, inverse = np.unique(n, return_inverse=True)
    harmonic = np.array([np.sum(1.0 / np.arange(1, k + 1)) for k in sizes])
    h, nf = harmonic[inverse].reshape(n.shape), n.astype(np.float64)
    # E[AP] = (1/P) sum over positives of E[precision at its rank] (Bestgen 2015).
    with np.errstate(invalid="ignore", divide="ignore"):
        e = h / nf + (n_pos - 1) * (nf - h) / (nf * np.maximum(nf - 1, 1))
    return np.where(n_pos > 0, e, np.nan)


def per_genre_metrics(y_true: np.ndarray, y_score: np.ndarray) -> dict[str, np.ndarray]:
    """Per-genre support, prevalence, AP, ROC-AUC, and the APs of a constant / random scorer."""
    y_true, y_score, _ = _as_2d(y_true, y_score)
    n = len(y_true)
    support = y_true.sum(axis=0)
    prevalence = support / n if n else np.full(support.shape, np.nan)
    return {
        "support": support,
        "prevalence": prevalence,
        "ap": average_precision(y_true, y_score),
        "roc_auc": roc_auc(y_true, y_score),
        "chance_ap": np.where(support > 0, prevalence, np.nan),
        "random_ap": random_ranking_ap(np.full(support.shape, n), support),
    }


def tagging_metrics(
    y_true: np.ndarray,
    y_score: np.ndarray,
    genres: list[str] | None = None,
    prior: np.ndarray | None = None,
) -> dict:
    """Summary metrics, their chance levels and per-genre records (JSON-ready: nan -> None).

    Chance levels (``chance_*``) are the exact values of the *prior-only* predictor,
    which gives every track the same score per genre: ``prior`` (e.g. the training
    prevalence of each genre) if given, else the genre's prevalence in ``y_true``.
    A constant column has one tie group, so its AP is the genre's prevalence p_g
    whatever the prior: chance_ap_macro = mean p_g over present genres,
    chance_ap_weighted = sum n_g p_g / sum n_g, chance_roc_auc_macro = 0.5.
    chance_ap_micro is the micro-AP of the prior scores broadcast over the tracks
    (it ranks frequent genres first, so it exceeds the overall positive rate
    ``chance_ap_micro_constant``, the micro-AP of one score for everything).
    ``random_*`` are the expected APs of uniformly random scores, which exceed
    p_g by about (1 - p_g) ln(n) / n: noticeable for rare genres.
    """
    y_true, y_score, _ = _as_2d(y_true, y_score)
    n, n_genres = y_true.shape
    if genres is not None and len(genres) != n_genres:
        raise GenreclfError(f"{len(genres)} genre names for {n_genres} score columns")
    pg = per_genre_metrics(y_true, y_score)
    support, ap, auc = pg["support"], pg["ap"], pg["roc_auc"]
    present = support > 0
    if prior is None:
        prior_scores, source = pg["prevalence"], "y_true"
    else:
        prior_scores, source = np.asarray(prior, dtype=np.float64), "given"
        if prior_scores.shape != (n_genres,):
            raise GenreclfError(f"prior has shape {prior_scores.shape}, expected ({n_genres},)")
    n_pairs = n * n_genres
    out = {
        "n_tracks": int(n),
        "n_genres": int(n_genres),
        "n_genres_ap": int(present.sum()),
        "n_genres_roc_auc": int((~np.isnan(auc)).sum()),
        "macro_genre_set": MACRO_GENRE_SET,
        "n_positive_pairs": int(support.sum()),
        "ap_weighted": _weighted(ap, support),
        "ap_micro": ap_micro(y_true, y_score),
        "ap_macro": _macro(ap),
        "roc_auc_macro": _macro(auc),
        "chance_prior": source,
        "chance_ap_weighted": _weighted(pg["chance_ap"], support),
        "chance_ap_micro": ap_micro(y_true, np.broadcast_to(prior_scores, y_true.shape)),
        "chance_ap_micro_constant": float(support.sum() / n_pairs) if n_pairs else float("nan"),
        "chance_ap_macro": _macro(pg["chance_ap"]),
        "chance_roc_auc_macro": 0.5,
        "random_ap_weighted": _weighted(pg["random_ap"], support),
        "random_ap_micro": float(random_ranking_ap(n_pairs, support.sum())) if n_pairs else float("nan"),
        "random_ap_macro": _macro(pg["random_ap"]),
    }
    names = genres if genres is not None else [str(g) for g in range(n_genres)]
    out["per_genre"] = [
        {
            "genre": names[g],
            "support": int(support[g]),
            "prevalence": _json(pg["prevalence"][g]),
            "ap": _json(ap[g]),
            "roc_auc": _json(auc[g]),
        }
        for g in range(n_genres)
    ]
    return {k: _json(v) if isinstance(v, float) else v for k, v in out.items()}


def _json(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


_FAST = {"ap_macro": ap_macro, "ap_weighted": ap_weighted, "ap_micro": ap_micro, "roc_auc_macro": roc_auc_macro}


def _weighted_metric(name: str, y_true: np.ndarray, y_score: np.ndarray) -> Callable[[np.ndarray], float]:
    """Return w -> metric on the data with integer track weights w, sorting only once."""
    if name == "ap_micro":
        micro = _ranked_micro(y_true, y_score)
        return lambda w: float(micro.ap(w)[0])
    ranked = _Ranked(y_true, y_score)
    if name == "ap_weighted":
        return lambda w: _weighted(ranked.ap(w), ranked.support(w))
    per_genre = ranked.ap if name == "ap_macro" else ranked.roc_auc
    full = per_genre(np.ones(len(y_true), dtype=np.int64))
    return lambda w: fixed_set_macro(per_genre(w), full)


def fixed_set_macro(resampled: np.ndarray, full: np.ndarray) -> float:
    """Mean over the genres defined on the full test set; one undefined in a resample keeps its full-set value.

    A macro average is a mean over a set of genres, and its bootstrap must average the same set
    every time: the genres defined on the full test set (AP: a positive; ROC-AUC: a positive and
    a negative). A resample that misses a rare genre's only positives says nothing about that
    genre's AP, so the genre keeps its full-set value there. Dropping it instead (the mean over the
    genres the resample happens to hold) shifts the resamples towards the frequent genres, which
    score higher, and biases the interval upward; AP 0 would bias it downward. Keeping the value
    understates the rare genre's share of the variance a little, as its value does not vary there.
    """
    fixed = ~np.isnan(full)
    if not fixed.any():
        return float("nan")
    return float(np.where(np.isnan(resampled), full, resampled)[fixed].mean())


def _resolve(metric_fn: Metric | str) -> tuple[Metric, str | None]:
    if isinstance(metric_fn, str):
        if metric_fn not in _FAST:
            raise GenreclfError(f"unknown metric {metric_fn!r}; choose one of {sorted(_FAST)}")
        return _FAST[metric_fn], metric_fn
    name = next((k for k, f in _FAST.items() if f is metric_fn), None)
    return metric_fn, name


def _boot_stats(
    y_true: np.ndarray, scores: list[np.ndarray], metric_fn: Metric | str, n_boot: int, seed: int
) -> tuple[list[float], np.ndarray, np.ndarray]:
    """Point values, (n_boot, len(scores)) resampled values and (groups, len(scores)) jackknife values.

    The same track resamples serve every score; the jackknife leaves out one group of
    tracks at a time (one track each for up to JACKKNIFE_GROUPS tracks).
    """
    if n_boot < 1:
        raise GenreclfError(f"n_boot must be >= 1, got {n_boot}")
    fn, name = _resolve(metric_fn)
    checked = [_as_2d(y_true, s) for s in scores]
    n = len(checked[0][0])
    if n == 0:
        raise GenreclfError("no tracks to bootstrap")
    points = [float(fn(y, s)) for y, s, _ in checked]
    if name is not None:  # resampling tracks with replacement == integer weights (tied duplicates)
        weighted = [_weighted_metric(name, y, s) for y, s, _ in checked]

        def on(w: np.ndarray) -> list[float]:
            return [f(w) for f in weighted]
    else:

        def on(w: np.ndarray) -> list[float]:
            idx = np.repeat(np.arange(n), w)
            return [fn(y[idx], s[idx]) for y, s, _ in checked]

    rng = np.random.default_rng(seed)
    stats = np.array([on(np.bincount(rng.integers(0, n, n), minlength=n)) for _ in range(n_boot)])
    groups = np.array_split(np.random.default_rng(seed + 1).permutation(n), min(n, JACKKNIFE_GROUPS))
    jack = np.array([on(_without(n, g)) for g in groups if len(g) < n]).reshape(-1, len(scores))
    return points, stats, jack


JACKKNIFE_GROUPS = 200  # leave-one-group-out beyond this many tracks: the acceleration needs no more


def _without(n: int, group: np.ndarray) -> np.ndarray:
    w = np.ones(n, dtype=np.int64)
    w[group] = 0
    return w


def _interval(values: np.ndarray, point: float, jack: np.ndarray, alpha: float) -> tuple[float, float]:
    """Return the BCa (bias-corrected and accelerated) bootstrap interval (Efron 1987).

    The percentile interval assumes the resampled values are centred on the point
    estimate; for average precision over a few dozen tracks they are not (resamples
    duplicate tracks and drop rare genres, and most land above the estimate). BCa
    shifts the percentiles by the resamples' median bias (z0) and the jackknife's
    skewness (acceleration); with no bias and no skew it is the percentile interval.
    """
    values, jack = values[~np.isnan(values)], jack[~np.isnan(jack)]
    if values.size == 0 or np.isnan(point):
        return float("nan"), float("nan")
    normal = NormalDist()
    below = (np.count_nonzero(values < point) + 0.5 * np.count_nonzero(values == point)) / values.size
    z0 = normal.inv_cdf(min(max(below, 0.5 / values.size), 1 - 0.5 / values.size))
    spread = jack.mean() - jack if jack.size > 1 else np.zeros(1)
    scale = 6.0 * float(np.sum(spread**2)) ** 1.5
    accel = float(np.sum(spread**3)) / scale if scale > 0 else 0.0
    levels = []
    for tail in (alpha / 2, 1 - alpha / 2):
        z = z0 + normal.inv_cdf(tail)
        levels.append(normal.cdf(z0 + z / (1 - accel * z)))
    low, high = np.quantile(values, levels)
    return float(low), float(high)


def bootstrap_ci(
    y_true: np.ndarray,
    y_score: np.ndarray,
    metric_fn: Metric | str,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """Return (point, low, high): the metric and its BCa interval over track resamples.

    metric_fn(y_true, y_score) -> float, or the name of (or one of) ap_macro,
    ap_weighted, ap_micro, roc_auc_macro, which use a fast path (the same resamples,
    as integer track weights). Resamples where the metric is nan are dropped. The
    macro averages' resamples average the genre set of the full data (fixed_set_macro).
    """
    points, stats, jack = _boot_stats(y_true, [y_score], metric_fn, n_boot, seed)
    return (points[0], *_interval(stats[:, 0], points[0], jack[:, 0], alpha))


def paired_bootstrap_diff(
    y_true: np.ndarray,
    score_a: np.ndarray,
    score_b: np.ndarray,
    metric_fn: Metric | str,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, float]:
    """Return metric(a) - metric(b), its BCa interval and the share of resamples where a > b.

    Both models are scored on the same track resample each time, so the interval
    is for the difference itself (narrower than comparing two separate intervals).
    """
    (a, b), stats, jack = _boot_stats(y_true, [score_a, score_b], metric_fn, n_boot, seed)
    diff = stats[:, 0] - stats[:, 1]
    low, high = _interval(diff, a - b, jack[:, 0] - jack[:, 1], alpha)
    ok = ~np.isnan(diff)
    return {
        "a": a,
        "b": b,
        "diff": a - b,
        "low": low,
        "high": high,
        "frac_a_better": float((diff[ok] > 0).mean()) if ok.any() else float("nan"),
        "n_boot": int(n_boot),
    }


def genre_columns(genre_ids: np.ndarray, track_genre_ids: np.ndarray) -> np.ndarray:
    """Column index of each track's genre id (e.g. FMA genre_top) in genre_ids; -1 where id < 1 (missing)."""
    genre_ids = np.asarray(genre_ids)
    track_genre_ids = np.asarray(track_genre_ids, dtype=np.int64)
    lookup = {int(g): c for c, g in enumerate(genre_ids)}
    unknown = sorted({int(t) for t in track_genre_ids if t >= 1 and int(t) not in lookup})
    if unknown:
        raise GenreclfError(f"genre ids {unknown[:5]} are not among the model's genres")
    return np.array([lookup[int(t)] if t >= 1 else -1 for t in track_genre_ids], dtype=np.int64)


def top_level_accuracy(y_score: np.ndarray, is_top_level: np.ndarray, true_column: np.ndarray) -> tuple[float, int]:
    """Return (accuracy, n tracks) of the argmax over top-level genre columns against genre_top.

    FMA's single-label view: is_top_level (G,) marks the 16 root genres (genre id ==
    its top_level id, parent 0); true_column (n,) is the column of each track's
    genre_top (see genre_columns), -1 for tracks without one, which are excluded.
    Accuracy is nan when no track has a genre_top.
    """
    y_score = np.asarray(y_score, dtype=np.float64)
    is_top_level = np.asarray(is_top_level, dtype=bool)
    true_column = np.asarray(true_column, dtype=np.int64)
    if y_score.ndim != 2 or is_top_level.shape != (y_score.shape[1],) or true_column.shape != (len(y_score),):
        raise GenreclfError(
            f"scores {y_score.shape}, top-level mask {is_top_level.shape} and targets {true_column.shape} do not match"
        )
    top_cols = np.flatnonzero(is_top_level)
    has = true_column >= 0
    if not np.isin(true_column[has], top_cols).all():
        raise GenreclfError("a track's genre_top is not one of the top-level genre columns")
    if not has.any():
        return float("nan"), 0
    pred = top_cols[np.argmax(y_score[has][:, top_cols], axis=1)]
    return float(np.mean(pred == true_column[has])), int(has.sum())
