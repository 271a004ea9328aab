"""Intervals over training seeds and test tracks: the numbers of `genreclf compare`.

A model's test score moves with the seed it was trained with (initial weights, crops, dropout
masks) as much as with the tracks it is tested on. Given every (model, seed) run's scores on the
same test tracks, this module returns each model's mean over seeds, and each pair's difference,
with an interval that covers both.

Both come from one set of track resamples shared by every run (integer track weights, see
genreclf.metrics), so that models are paired on the tracks. For a model m with S seeds, values
p_s on the test tracks and v_bs on track resample b, the mean's variance has two parts:

    seeds   var_s(p_s) / S        (how far runs of other seeds would land), S - 1 degrees of freedom
    tracks  var_b(mean_s v_bs)    (how far other test tracks would move the mean of these seeds)

and the interval is the mean +- t * sqrt(seeds + tracks), with the Welch-Satterthwaite degrees of
freedom (the track part, from many tracks, counts as known), clipped to the metric's range. With
3 seeds the seed part has 2 degrees of freedom, and t = 4.3 rather than 1.96: a bootstrap over
3 seeds cannot see that 3 values say little about their spread. A difference adds the two models'
seed parts and takes the track part of the paired difference of the means. The seed part holds
the seeds' own track errors too, which the track part counts again: the interval errs on the wide
side (simulated: it covered 93-97% where 95% was asked).

The two-stage bootstrap (resample seeds within each model and tracks together, average the
resampled seeds) is computed too, as is each single run's track-only BCa interval, for contrast.
`benchmarks/interval_coverage.py --mode seeds` measures how often each covers the population value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t

from genreclf.errors import GenreclfError
from genreclf.metrics import _boot_stats, _interval

MIN_SEEDS = 2  # a standard deviation across seeds needs two
RANGE = (0.0, 1.0)  # of every summary metric (AP, ROC-AUC): intervals are clipped to it, differences to +-1


@dataclass(frozen=True)
class Resamples:
    """One metric of every (model, seed) run on the test tracks and on the same track resamples."""

    metric: str
    points: dict[str, np.ndarray]  # model -> (seeds,) values on the test tracks
    values: dict[str, np.ndarray]  # model -> (n_boot, seeds) values on each track resample
    jack: dict[str, np.ndarray]  # model -> (groups, seeds) values leaving out one group of tracks
    seed_draws: dict[str, np.ndarray]  # model -> (n_boot, seeds) seeds drawn with replacement, per track resample


def resample(
    y_true: np.ndarray, scores: dict[str, list[np.ndarray]], metric: str, n_boot: int = 1000, seed: int = 0
) -> Resamples:
    """Return `metric` of every model's runs (scores[model][k]: seed k's) on the test tracks and on track resamples."""
    for model, runs in scores.items():
        if len(runs) < MIN_SEEDS:
            raise GenreclfError(
                f"{model}: {len(runs)} seed(s); a standard deviation across seeds needs at least {MIN_SEEDS}"
            )
    flat = [s for runs in scores.values() for s in runs]
    points, stats, jack = _boot_stats(y_true, flat, metric, n_boot, seed)
    points = np.asarray(points)
    out: dict[str, dict[str, np.ndarray]] = {"points": {}, "values": {}, "jack": {}, "seed_draws": {}}
    rng = np.random.default_rng(seed + 2)  # _boot_stats draws tracks with seed and seed + 1
    start = 0
    for model, runs in scores.items():
        cols = slice(start, start + len(runs))
        start += len(runs)
        out["points"][model] = points[cols]
        out["values"][model] = stats[:, cols]
        out["jack"][model] = jack[:, cols]
        out["seed_draws"][model] = rng.integers(0, len(runs), (n_boot, len(runs)))
    return Resamples(metric, **out)


def _t_interval(
    centre: float, seed_parts: list[tuple[float, int]], track_var: float, alpha: float, bounds: tuple[float, float]
) -> dict:
    """Return centre +- t * sqrt(seed parts + track_var) within bounds: Welch-Satterthwaite df of the seed parts."""
    seed_var = sum(v for v, _ in seed_parts)
    total = seed_var + track_var
    denominator = sum(v**2 / df for v, df in seed_parts)
    df = total**2 / denominator if denominator > 0 else float("inf")
    se = float(np.sqrt(total))
    q = float(student_t.ppf(1 - alpha / 2, df))  # the normal quantile for df = inf
    return {
        "low": max(centre - q * se, bounds[0]),
        "high": min(centre + q * se, bounds[1]),
        "se": se,
        "df": df,
        "seed_var": seed_var,
        "track_var": track_var,
        "seed_share": seed_var / total if total > 0 else float("nan"),
    }


def _finite_rows(*arrays: np.ndarray) -> np.ndarray:
    """Rows (track resamples) on which every given (n_boot, k) or (n_boot,) array is finite."""
    ok = np.ones(len(arrays[0]), dtype=bool)
    for a in arrays:
        ok &= np.isfinite(a.reshape(len(a), -1)).all(axis=1)
    return ok


def _two_stage(r: Resamples, model: str) -> np.ndarray:
    """(n_boot,) means over each replicate's resampled seeds, on that replicate's track resample."""
    return np.take_along_axis(r.values[model], r.seed_draws[model], axis=1).mean(axis=1)


def _quantiles(values: np.ndarray, alpha: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not values.size:
        return float("nan"), float("nan")
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def model_summary(r: Resamples, model: str, alpha: float = 0.05) -> dict:
    """Return a model's mean and sd over seeds, its seeds-and-tracks interval, and each seed's own interval."""
    p, v, jack = r.points[model], r.values[model], r.jack[model]
    ok = _finite_rows(v)
    n_seeds = len(p)
    mean, sd = float(p.mean()), float(p.std(ddof=1))
    track_mean = v[ok].mean(axis=1)
    interval = _t_interval(mean, [(sd**2 / n_seeds, n_seeds - 1)], float(track_mean.var(ddof=1)), alpha, RANGE)
    per_seed = []
    for k in range(n_seeds):
        low, high = _interval(v[:, k], float(p[k]), jack[:, k], alpha)
        per_seed.append({"value": float(p[k]), "low": low, "high": high})
    two_low, two_high = _quantiles(_two_stage(r, model)[ok], alpha)
    return {
        "model": model,
        "n_seeds": n_seeds,
        "mean": mean,
        "sd": sd,
        **interval,
        "two_stage_low": two_low,
        "two_stage_high": two_high,
        "per_seed": per_seed,
    }


def pair_summary(r: Resamples, a: str, b: str, alpha: float = 0.05) -> dict:
    """Return mean(a) - mean(b) over seeds with its seeds-and-tracks interval, the contrasts, and a verdict."""
    pa, pb = r.points[a], r.points[b]
    va, vb = r.values[a], r.values[b]
    ok = _finite_rows(va, vb)
    diff = float(pa.mean() - pb.mean())
    tracks_diff = va.mean(axis=1) - vb.mean(axis=1)
    seed_parts = [(float(p.var(ddof=1)) / len(p), len(p) - 1) for p in (pa, pb)]
    span = RANGE[1] - RANGE[0]
    interval = _t_interval(diff, seed_parts, float(tracks_diff[ok].var(ddof=1)), alpha, (-span, span))
    two_stage = (_two_stage(r, a) - _two_stage(r, b))[ok]
    jack_diff = r.jack[a].mean(axis=1) - r.jack[b].mean(axis=1)
    tracks_low, tracks_high = _interval(tracks_diff, diff, jack_diff, alpha)
    two_low, two_high = _quantiles(two_stage, alpha)
    out = {
        "metric": r.metric,
        "a": a,
        "b": b,
        "mean_a": float(pa.mean()),
        "mean_b": float(pb.mean()),
        "diff": diff,
        **interval,
        "two_stage_low": two_low,
        "two_stage_high": two_high,
        "tracks_only_low": tracks_low,
        "tracks_only_high": tracks_high,
        "frac_a_better": float((two_stage > 0).mean()) if two_stage.size else float("nan"),
        "excludes_zero": bool(interval["low"] > 0 or interval["high"] < 0),
    }
    out["verdict"] = verdict(out)
    return out


def verdict(pair: dict, digits: int = 3) -> str:
    """Return the plain-words verdict of a pair_summary: which model is better, or no clear difference."""
    a, b, diff, low, high = pair["a"], pair["b"], pair["diff"], pair["low"], pair["high"]
    if not (np.isfinite(low) and np.isfinite(high)):
        return f"{a} vs {b}: undefined on these tracks"
    shown = f"{a} − {b} = {diff:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"
    if not pair["excludes_zero"]:
        return f"no clear difference between {a} and {b}: {shown}, the interval includes 0"
    better, worse = (a, b) if diff > 0 else (b, a)
    return f"{better} better than {worse}: {shown}, the interval excludes 0"


def pairs(models: list[str]) -> list[tuple[str, str]]:
    """Return every pair (later model, earlier model): differences read as later − earlier, as in the report."""
    return [(models[j], models[i]) for i in range(len(models)) for j in range(i + 1, len(models))]


def summarise(
    y_true: np.ndarray,
    scores: dict[str, list[np.ndarray]],
    metric: str,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict:
    """Return one metric's model summaries and pair differences over seeds and test tracks."""
    r = resample(y_true, scores, metric, n_boot, seed)
    models = list(scores)
    return {
        "metric": metric,
        "models": [model_summary(r, m, alpha) for m in models],
        "pairs": [pair_summary(r, a, b, alpha) for a, b in pairs(models)],
    }
