"""How honest are the report's intervals? Coverage of the population value, simulated.

    python benchmarks/interval_coverage.py [--sizes 30 100 1000] [--sims 100] [--boot 400]

A synthetic population of 200,000 tracks over 20 genres (prevalence 3%-35%, a noisy
scorer) has a known "population" value of every metric. From it, --sims test sets of
each size are drawn; for each, genreclf.metrics computes the metric and two 95% intervals
from the same track resamples: the percentile interval and the BCa interval that
`genreclf report` uses. Printed: the population value, the mean estimate over test sets
(its small-sample bias), and how often each interval contains the population value
(ideally 0.95), with the mean widths.
"""

from __future__ import annotations

import argparse

import numpy as np

from genreclf import metrics as M

GENRES = 20
PREVALENCE = np.geomspace(0.03, 0.35, GENRES)
SEPARATION = 1.2  # logit shift of a positive's score


def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Return n tracks' multi-hot labels (at least one genre each) and a noisy scorer's scores."""
    y = (rng.random((n, GENRES)) < PREVALENCE).astype(np.int8)
    empty = np.flatnonzero(y.sum(axis=1) == 0)
    y[empty, rng.integers(0, GENRES, len(empty))] = 1
    scores = 1 / (1 + np.exp(-(SEPARATION * y + rng.normal(0, 1, y.shape))))
    return y, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[30, 100, 1000], help="test-set sizes")
    parser.add_argument("--sims", type=int, default=100, help="test sets per size (default 100)")
    parser.add_argument("--boot", type=int, default=400, help="bootstrap resamples per test set (default 400)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    population = draw(rng, 200_000)
    print(
        f"{'tracks':>6} {'metric':<14} {'population':>10} {'mean est.':>9}   coverage: {'percentile':>10} "
        f"{'BCa':>5}   mean width: {'percentile':>10} {'BCa':>6}"
    )
    for n in args.sizes:
        for name in ("ap_weighted", "ap_macro", "ap_micro", "roc_auc_macro"):
            truth = M._FAST[name](*population)
            estimates, covered, widths = [], np.zeros(2), np.zeros(2)
            for k in range(args.sims):
                y, s = draw(rng, n)
                (point,), stats, jack = M._boot_stats(y, [s], name, args.boot, seed=k)
                values = stats[~np.isnan(stats[:, 0]), 0]
                for j, (low, high) in enumerate(
                    [np.quantile(values, [0.025, 0.975]), M._interval(stats[:, 0], point, jack[:, 0], 0.05)]
                ):
                    covered[j] += low <= truth <= high
                    widths[j] += high - low
                estimates.append(point)
            c, w = covered / args.sims, widths / args.sims
            print(
                f"{n:6d} {name:<14} {truth:10.3f} {np.mean(estimates):9.3f}   {'':10}{c[0]:10.2f} {c[1]:5.2f}   "
                f"{'':12}{w[0]:10.3f} {w[1]:6.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
