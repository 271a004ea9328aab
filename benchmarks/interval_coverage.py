"""How honest are the report's intervals? Coverage of the population value, simulated.

    python benchmarks/interval_coverage.py [--sizes 30 100 1000] [--sims 100] [--boot 400]
    python benchmarks/interval_coverage.py --mode seeds [--seeds 3 5] [--sizes 30 100] [--sims 200] [--boot 400]

A synthetic population of 200,000 tracks over 20 genres (prevalence 3%-35%, a noisy
scorer) has a known "population" value of every metric. From it, --sims test sets of
each size are drawn; for each, genreclf.metrics computes the metric and two 95% intervals
from the same track resamples: the percentile interval and the BCa interval that
`genreclf report` uses. Printed: the population value, the mean estimate over test sets
(its small-sample bias), and how often each interval contains the population value
(ideally 0.95), with the mean widths.

--mode seeds checks `genreclf compare` (genreclf.compare_stats), where training randomness adds to
test-track sampling. Two models score the same population; each "training run" of a model draws its
own quality (a logit separation of SEPARATION + its model's gap + --seed-sd x N(0, 1)) and its own
per-track errors (OWN_NOISE), on top of errors shared by every run on the same track (SHARED_NOISE:
hard tracks are hard for all). The population difference is E_seed[metric on all tracks] of one model
minus the other's (Gauss-Hermite over the seed draw, each on 200,000 tracks). Each simulated experiment
trains --seeds runs of each model, tests them on one set of tracks, and computes four 95% intervals of
the difference: compare's seeds-and-tracks t interval, the two-stage bootstrap (seeds and tracks
resampled together, percentile), the track-only paired BCa interval of the seed means, and the
track-only paired BCa interval of one run of each (what `genreclf report` gives for single runs).
Printed: how often each covers the population difference, their mean widths, and how often the
t interval's verdict names a winner; and the same for the mean of the first model alone.
"""

from __future__ import annotations

import argparse
import functools

import numpy as np

from genreclf import compare_stats as CS
from genreclf import metrics as M

GENRES = 20
PREVALENCE = np.geomspace(0.03, 0.35, GENRES)
SEPARATION = 1.2  # logit shift of a positive's score


def labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """Return n tracks' multi-hot labels, at least one genre each."""
    y = (rng.random((n, GENRES)) < PREVALENCE).astype(np.int8)
    empty = np.flatnonzero(y.sum(axis=1) == 0)
    y[empty, rng.integers(0, GENRES, len(empty))] = 1
    return y


def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Return n tracks' multi-hot labels (at least one genre each) and a noisy scorer's scores."""
    y = labels(rng, n)
    scores = 1 / (1 + np.exp(-(SEPARATION * y + rng.normal(0, 1, y.shape))))
    return y, scores


def tracks_coverage(args: argparse.Namespace) -> None:
    """Print the coverage of the report's track-only intervals (percentile and BCa) by test-set size."""
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


SHARED_NOISE = 0.8  # logit noise every run of every model makes on a (track, genre): hard tracks
OWN_NOISE = 0.6  # logit noise of one run alone; sqrt(0.8^2 + 0.6^2) = 1, the noise of the tracks mode
POPULATION = 200_000  # tracks on which the population values are computed (--population)
NODES = 9  # Gauss-Hermite nodes of the expectation over the seed draw


@functools.cache
def _population(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n population tracks' labels and a run's logit noise on them (the same at every node: smooth in separation)."""
    rng = np.random.default_rng(1)
    y = labels(rng, n)
    return y, rng.normal(0, np.hypot(SHARED_NOISE, OWN_NOISE), y.shape)


def population_values(metric: str, separation: float, seed_sd: float, n: int = POPULATION) -> tuple[float, float]:
    """Return the mean and sd over seeds of the metric on the population, for runs of separation + seed_sd x N(0, 1)."""
    y, noise = _population(n)
    nodes, weights = np.polynomial.hermite_e.hermegauss(NODES)
    weights = weights / weights.sum()
    values = np.array([M._FAST[metric](y, sep * y + noise) for sep in separation + seed_sd * nodes])
    mean = float(weights @ values)
    return mean, float(np.sqrt(weights @ (values - mean) ** 2))


def experiment(rng: np.random.Generator, n: int, seeds: int, separations: dict[str, float], seed_sd: float) -> tuple:
    """Return one simulated comparison: test labels and {model: [scores of each seed's run]}."""
    y = labels(rng, n)
    shared = rng.normal(0, SHARED_NOISE, y.shape)
    scores = {
        model: [(sep + seed_sd * rng.normal()) * y + shared + rng.normal(0, OWN_NOISE, y.shape) for _ in range(seeds)]
        for model, sep in separations.items()
    }
    return y, scores


def seeds_coverage(args: argparse.Namespace) -> None:
    """Print the coverage of compare's intervals, and of track-only ones, when seeds and tracks both vary."""
    separations = {"A": SEPARATION + args.gap, "B": SEPARATION}
    print(
        f"models A, B: logit separation {separations['A']:.2f} vs {separations['B']:.2f}, seed sd {args.seed_sd} "
        f"(logit); {args.sims} experiments per row, {args.boot} resamples; 95% intervals"
    )
    print(
        f"{'tracks':>6} {'seeds':>5} {'metric':<14} {'A - B':>6} {'sd(A)':>6}   coverage of A - B: {'t':>5} "
        f"{'2-stage':>7} {'trk-mean':>8} {'trk-1run':>8}   width: {'t':>5} {'2-stage':>7}   A wins   "
        f"coverage of A: {'t':>5} {'2-stage':>7}"
    )
    for metric in args.metrics:
        population = {
            m: population_values(metric, sep, args.seed_sd, args.population) for m, sep in separations.items()
        }
        truth, seed_sd = {m: mean for m, (mean, _) in population.items()}, population["A"][1]
        for n in args.sizes:
            for seeds in args.seeds:
                rng = np.random.default_rng([n, seeds])
                covered, widths, wins, covered_a = np.zeros(4), np.zeros(2), 0, np.zeros(2)
                target = truth["A"] - truth["B"]
                for k in range(args.sims):
                    y, scores = experiment(rng, n, seeds, separations, args.seed_sd)
                    r = CS.resample(y, scores, metric, args.boot, seed=k)
                    pair, a = CS.pair_summary(r, "A", "B"), CS.model_summary(r, "A")
                    single = M._interval(
                        r.values["A"][:, 0] - r.values["B"][:, 0],
                        float(r.points["A"][0] - r.points["B"][0]),
                        r.jack["A"][:, 0] - r.jack["B"][:, 0],
                        0.05,
                    )
                    intervals = [
                        (pair["low"], pair["high"]),
                        (pair["two_stage_low"], pair["two_stage_high"]),
                        (pair["tracks_only_low"], pair["tracks_only_high"]),
                        single,
                    ]
                    covered += [low <= target <= high for low, high in intervals]
                    widths += [high - low for low, high in intervals[:2]]
                    wins += pair["excludes_zero"] and pair["diff"] > 0
                    covered_a += [
                        a["low"] <= truth["A"] <= a["high"],
                        a["two_stage_low"] <= truth["A"] <= a["two_stage_high"],
                    ]
                c, w, ca = covered / args.sims, widths / args.sims, covered_a / args.sims
                print(
                    f"{n:6d} {seeds:5d} {metric:<14} {target:6.3f} {seed_sd:6.3f}   {'':18} {c[0]:5.2f} {c[1]:7.2f} "
                    f"{c[2]:8.2f} {c[3]:8.2f}   {'':7}{w[0]:5.3f} {w[1]:7.3f}   {wins / args.sims:6.2f}   "
                    f"{'':14} {ca[0]:5.2f} {ca[1]:7.2f}",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["tracks", "seeds"], default="tracks", help="which intervals to check")
    parser.add_argument("--sizes", type=int, nargs="+", help="test-set sizes (default 30 100 1000; seeds: 30 100)")
    parser.add_argument("--sims", type=int, help="test sets (experiments) per row (default 100; seeds: 200)")
    parser.add_argument("--boot", type=int, default=400, help="bootstrap resamples per test set (default 400)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 5], help="seeds mode: runs per model")
    parser.add_argument("--gap", type=float, default=0.15, help="seeds mode: model A's extra logit separation")
    parser.add_argument("--seed-sd", type=float, default=0.15, help="seeds mode: sd of a run's logit separation")
    parser.add_argument("--population", type=int, default=POPULATION, help="seeds mode: tracks of the population")
    parser.add_argument(
        "--metrics", nargs="+", default=["ap_weighted", "roc_auc_macro"], choices=sorted(M._FAST), help="seeds mode"
    )
    args = parser.parse_args()
    if args.mode == "tracks":
        args.sizes, args.sims = args.sizes or [30, 100, 1000], args.sims or 100
        tracks_coverage(args)
    else:
        args.sizes, args.sims = args.sizes or [30, 100], args.sims or 200
        seeds_coverage(args)


if __name__ == "__main__":
    main()
