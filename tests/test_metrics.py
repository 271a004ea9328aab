"""Tests for genreclf.metrics: sklearn equivalence, hand-computed values, chance levels, bootstrap."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from genreclf import metrics as M
from genreclf.errors import GenreclfError


def _random_case(rng: np.random.Generator, n: int, g: int, decimals: int) -> tuple[np.ndarray, np.ndarray]:
    """Multi-hot labels with varied prevalences (every genre has both classes) and tied scores."""
    y = (rng.random((n, g)) < rng.uniform(0.02, 0.5, g)).astype(int)
    y[0], y[1] = 1, 0
    s = np.round(rng.random((n, g)) + 0.3 * y, decimals)
    return y, s


@pytest.mark.parametrize("decimals", [1, 2, 6])
def test_fast_ap_and_roc_auc_equal_sklearn_with_ties(decimals: int) -> None:
    rng = np.random.default_rng(decimals)
    for _ in range(10):
        n, g = int(rng.integers(3, 400)), int(rng.integers(1, 12))
        y, s = _random_case(rng, n, g, decimals)
        ap, auc = M.average_precision(y, s), M.roc_auc(y, s)
        for j in range(g):
            assert abs(ap[j] - average_precision_score(y[:, j], s[:, j])) < 1e-12
            assert abs(auc[j] - roc_auc_score(y[:, j], s[:, j])) < 1e-12
        assert abs(M.average_precision(y[:, 0], s[:, 0]) - ap[0]) < 1e-15  # 1-D input gives a float


def test_averages_equal_sklearn() -> None:
    rng = np.random.default_rng(0)
    y, s = _random_case(rng, 300, 20, 2)
    assert abs(M.ap_weighted(y, s) - average_precision_score(y, s, average="weighted")) < 1e-12
    assert abs(M.ap_micro(y, s) - average_precision_score(y, s, average="micro")) < 1e-12
    assert abs(M.ap_macro(y, s) - average_precision_score(y, s, average="macro")) < 1e-12
    assert abs(M.roc_auc_macro(y, s) - roc_auc_score(y, s, average="macro")) < 1e-12


@pytest.mark.filterwarnings("ignore:No positive class found")
def test_macro_averages_skip_undefined_genres() -> None:
    rng = np.random.default_rng(1)
    y, s = _random_case(rng, 200, 6, 2)
    y[:, 2] = 0  # no positive: AP and ROC-AUC undefined
    y[:, 4] = 1  # no negative: AP is 1 by definition, ROC-AUC undefined
    ap = [average_precision_score(y[:, j], s[:, j]) for j in (0, 1, 3, 4, 5)]
    auc = [roc_auc_score(y[:, j], s[:, j]) for j in (0, 1, 3, 5)]
    assert abs(M.ap_macro(y, s) - np.mean(ap)) < 1e-12
    assert abs(M.roc_auc_macro(y, s) - np.mean(auc)) < 1e-12
    assert abs(M.ap_weighted(y, s) - average_precision_score(y, s, average="weighted")) < 1e-12
    pg = M.per_genre_metrics(y, s)
    assert np.isnan(pg["ap"][2]) and np.isnan(pg["roc_auc"][2]) and np.isnan(pg["roc_auc"][4])
    assert pg["ap"][4] == 1.0
    summary = M.tagging_metrics(y, s, genres=list("abcdef"))
    assert (summary["n_genres_ap"], summary["n_genres_roc_auc"], summary["n_tracks"]) == (5, 4, 200)
    rec = summary["per_genre"][2]
    assert rec["genre"] == "c" and rec["support"] == 0 and rec["ap"] is None and rec["roc_auc"] is None


def test_tiny_example_by_hand() -> None:
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    s = np.array([[0.9, 0.5], [0.8, 0.5], [0.7, 0.2], [0.1, 0.5]])
    # Genre 0: P N P N -> AP = (1/1 + 2/3) / 2; positives beat 2/2 and 1/2 negatives.
    # Genre 1: tie group {0.5: N P N} has precision 1/3 at recall 1/2, then 2/4 at recall 1;
    # its positive at 0.5 ties both negatives (1/2 each), the one at 0.2 beats none.
    np.testing.assert_allclose(M.average_precision(y, s), [5 / 6, 5 / 12], rtol=0, atol=1e-15)
    np.testing.assert_allclose(M.roc_auc(y, s), [3 / 4, 1 / 4], rtol=0, atol=1e-15)
    assert M.ap_macro(y, s) == pytest.approx(15 / 24, abs=1e-15)
    assert M.ap_weighted(y, s) == pytest.approx(15 / 24, abs=1e-15)
    # All 8 pairs: .9P .8N .7P {.5 N P N} .2P .1N -> precisions 1, 2/3, 3/6, 4/7 at each positive.
    assert M.ap_micro(y, s) == pytest.approx((1 + 2 / 3 + 1 / 2 + 4 / 7) / 4, abs=1e-15)


def test_constant_scorer_ap_is_prevalence_in_sklearn() -> None:
    rng = np.random.default_rng(2)
    y = (rng.random(997) < 0.07).astype(int)
    assert average_precision_score(y, np.full(997, 0.3)) == y.mean()
    assert M.average_precision(y, np.full(997, 0.3)) == y.mean()
    assert M.roc_auc(y, np.full(997, 0.3)) == 0.5


def test_chance_levels_are_the_prior_only_predictor() -> None:
    rng = np.random.default_rng(3)
    y, _ = _random_case(rng, 500, 15, 2)
    y[:, 7] = 0
    n_g = y.sum(axis=0)
    p = n_g / len(y)
    present = n_g > 0
    prior_scores = np.broadcast_to(p, y.shape)
    m = M.tagging_metrics(y, prior_scores)
    assert m["chance_prior"] == "y_true"
    assert m["chance_ap_macro"] == pytest.approx(p[present].mean(), abs=1e-12)
    assert m["chance_ap_weighted"] == pytest.approx((n_g * p).sum() / n_g.sum(), abs=1e-12)
    assert m["chance_roc_auc_macro"] == 0.5
    # The prior-only predictor scores exactly its chance levels.
    for key in ("ap_macro", "ap_weighted", "ap_micro", "roc_auc_macro"):
        assert m[key] == pytest.approx(m["chance_" + key], abs=1e-12)
    # Ranking frequent genres first beats one constant score for every pair.
    assert m["chance_ap_micro"] > m["chance_ap_micro_constant"] + 0.05
    const = M.tagging_metrics(y, np.full(y.shape, 0.5))
    assert const["ap_micro"] == pytest.approx(y.sum() / y.size, abs=1e-12)
    assert const["chance_ap_micro_constant"] == pytest.approx(y.sum() / y.size, abs=1e-12)
    # A given (training) prior changes only the micro chance level.
    train_prior = rng.permutation(p)
    given = M.tagging_metrics(y, prior_scores, prior=train_prior)
    assert given["chance_prior"] == "given"
    assert given["chance_ap_macro"] == m["chance_ap_macro"]
    assert given["chance_ap_micro"] == pytest.approx(M.ap_micro(y, np.broadcast_to(train_prior, y.shape)))


def test_random_scorers_average_to_the_chance_levels() -> None:
    rng = np.random.default_rng(4)
    # Expected AP of a random ranking (n=30, 3 positives), 20000 rankings as columns.
    y = np.zeros((30, 20000), dtype=int)
    y[:3] = 1
    ap = M.average_precision(y, rng.random(y.shape))
    assert ap.mean() == pytest.approx(float(M.random_ranking_ap(30, 3)), rel=0.02)
    assert M.roc_auc(y, rng.random(y.shape)).mean() == pytest.approx(0.5, abs=0.01)
    # Whole summaries: random scores land near random_* and (loosely) near chance_*.
    y, _ = _random_case(rng, 400, 12, 2)
    expected = M.tagging_metrics(y, np.zeros(y.shape))
    scores = [rng.random(y.shape) for _ in range(100)]
    for key, chance in [("ap_macro",) * 2, ("ap_weighted",) * 2, ("ap_micro", "ap_micro_constant")]:
        mean = np.mean([M._FAST[key](y, s) for s in scores])
        assert mean == pytest.approx(expected["random_" + key], rel=0.02)
        assert mean == pytest.approx(expected["chance_" + chance], rel=0.15)
    assert np.mean([M.roc_auc_macro(y, s) for s in scores]) == pytest.approx(0.5, abs=0.01)


def test_bootstrap_perfect_scorer_has_degenerate_interval() -> None:
    rng = np.random.default_rng(5)
    y, _ = _random_case(rng, 100, 5, 2)
    s = y + 0.1 * rng.random(y.shape)
    for name in ("ap_macro", "ap_weighted", "ap_micro", "roc_auc_macro"):
        assert M.bootstrap_ci(y, s, name, n_boot=50) == (1.0, 1.0, 1.0)


def test_bootstrap_of_a_mean_matches_normal_theory() -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(2.0, 3.0, size=(2000, 1))
    point, low, high = M.bootstrap_ci(np.zeros_like(x, dtype=int), x, lambda _, s: float(s.mean()), n_boot=2000)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert point == pytest.approx(x.mean())
    assert low == pytest.approx(point - half, abs=0.15 * half)
    assert high == pytest.approx(point + half, abs=0.15 * half)


def test_bca_interval_matches_scipy_on_a_skewed_mean() -> None:
    from scipy.stats import bootstrap

    rng = np.random.default_rng(11)
    x = rng.exponential(1.0, size=(150, 1))  # skewed: BCa moves the interval right of the percentile one
    ours = M.bootstrap_ci(np.zeros_like(x, dtype=int), x, lambda _, s: float(s.mean()), n_boot=4000, seed=1)
    ref = bootstrap((x[:, 0],), np.mean, n_resamples=4000, method="BCa", random_state=2).confidence_interval
    width = ref.high - ref.low
    assert ours[1] == pytest.approx(ref.low, abs=0.06 * width)
    assert ours[2] == pytest.approx(ref.high, abs=0.06 * width)
    percentile = bootstrap((x[:, 0],), np.mean, n_resamples=4000, method="percentile", random_state=2)
    assert ours[1] > percentile.confidence_interval.low and ours[2] > percentile.confidence_interval.high


def test_bca_corrects_resamples_that_sit_above_the_estimate() -> None:
    rng = np.random.default_rng(12)
    y, s = _random_case(rng, 30, 20, 2)  # few tracks, rare genres: resampled AP lands mostly above the estimate
    points, stats, jack = M._boot_stats(y, [s], "ap_weighted", 1000, 0)
    assert np.mean(stats[:, 0] > points[0]) > 0.6
    point, low, high = M.bootstrap_ci(y, s, "ap_weighted", n_boot=1000, seed=0)
    assert low < point < high
    assert high < np.quantile(stats[:, 0], 0.975) and low < np.quantile(stats[:, 0], 0.025)


@pytest.mark.parametrize("name", ["ap_macro", "ap_weighted", "ap_micro", "roc_auc_macro"])
def test_fast_bootstrap_equals_resampling_tracks(name: str) -> None:
    rng = np.random.default_rng(7)
    y, s = _random_case(rng, 60, 8, 1)
    y[:, 3] = 0
    y[rng.integers(0, 60), 3] = 1  # a rare genre, absent from many resamples
    fn = M._FAST[name]
    if name in ("ap_macro", "roc_auc_macro"):  # resamples average the full set's genres, by hand here
        per_genre = M.average_precision if name == "ap_macro" else M.roc_auc
        full = per_genre(y, s)

        def slow_fn(a: np.ndarray, b: np.ndarray) -> float:
            resampled = per_genre(a, b)
            return float(np.where(np.isnan(resampled), full, resampled)[~np.isnan(full)].mean())
    else:

        def slow_fn(a: np.ndarray, b: np.ndarray) -> float:
            return fn(a, b)

    fast = M.bootstrap_ci(y, s, fn, n_boot=40, seed=3)
    slow = M.bootstrap_ci(y, s, slow_fn, n_boot=40, seed=3)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
    assert np.isfinite(fast).all()


@pytest.mark.parametrize("name", ["ap_macro", "roc_auc_macro"])
def test_macro_bootstrap_averages_a_fixed_genre_set(name: str) -> None:
    # Four common genres scored perfectly (AP = ROC-AUC = 1 on any resample) and a rare genre whose only
    # positive scores lowest: AP 1/20 and ROC-AUC 0 on the full set. About 36% of the resamples miss that
    # positive; dropping the genre there would average the four perfect ones alone, and give exactly 1.
    n = 20
    y = np.zeros((n, 5), dtype=int)
    y[::2, :4] = 1
    y[n - 1, 4] = 1
    s = y + np.linspace(0.5, 0.1, n)[:, None]
    s[n - 1, 4] = 0.0
    point = (4 + (1 / n if name == "ap_macro" else 0.0)) / 5
    assert M._FAST[name](y, s) == pytest.approx(point, abs=1e-15)
    points, stats, jack = M._boot_stats(y, [s], name, 300, 0)
    assert points[0] == pytest.approx(point, abs=1e-15)  # the point estimate is the full-set value
    draws = np.random.default_rng(0).integers(0, n, (300, n))  # the resamples _boot_stats draws with seed 0
    missed = (draws != n - 1).all(axis=1)
    assert 50 < missed.sum() < 250
    # Resamples without the rare positive average the same five genres, the rare one at its full-set value.
    np.testing.assert_allclose(stats[missed, 0], point, rtol=0, atol=1e-12)
    assert (stats[:, 0] < 1).all() and (jack[:, 0] < 1).all()
    if name == "roc_auc_macro":  # the rare positive is last in every resample that holds it: ROC-AUC 0 there too
        np.testing.assert_allclose(stats[:, 0], point, rtol=0, atol=1e-12)
    assert M.bootstrap_ci(y, s, name, n_boot=300)[0] == pytest.approx(point, abs=1e-15)


def test_paired_bootstrap() -> None:
    rng = np.random.default_rng(8)
    y, s = _random_case(rng, 300, 10, 3)
    same = M.paired_bootstrap_diff(y, s, s, "ap_macro", n_boot=100)
    assert (same["diff"], same["low"], same["high"], same["frac_a_better"]) == (0.0, 0.0, 0.0, 0.0)
    worse = s + rng.normal(0, 0.5, s.shape)
    d = M.paired_bootstrap_diff(y, s, worse, M.ap_weighted, n_boot=200)
    assert d["diff"] == pytest.approx(M.ap_weighted(y, s) - M.ap_weighted(y, worse))
    assert 0 < d["low"] < d["diff"] < d["high"] and d["frac_a_better"] == 1.0
    assert M.paired_bootstrap_diff(y, worse, s, "ap_weighted", n_boot=200)["frac_a_better"] == 0.0


def test_top_level_accuracy() -> None:
    genre_ids = np.array([2, 10, 12, 25, 38])  # 2, 12, 38 are roots; 10 is under 2, 25 under 12
    top_level = np.array([2, 2, 12, 12, 38])
    is_top = genre_ids == top_level
    true_col = M.genre_columns(genre_ids, [12, 2, -1, 38, 0])
    np.testing.assert_array_equal(true_col, [2, 0, -1, 4, -1])
    s = np.array(
        [
            [0.1, 0.0, 0.9, 0.0, 0.2],  # argmax 12: right
            [0.3, 0.9, 0.1, 0.0, 0.4],  # sub-genre column ignored; argmax 38: wrong
            [0.9, 0.0, 0.0, 0.0, 0.0],  # no genre_top: excluded
            [0.0, 0.0, 0.1, 0.9, 0.5],  # argmax 38: right
            [0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    assert M.top_level_accuracy(s, is_top, true_col) == (pytest.approx(2 / 3), 3)
    assert M.top_level_accuracy(s, is_top, np.full(5, -1))[1] == 0
    with pytest.raises(GenreclfError):
        M.genre_columns(genre_ids, [99])
    with pytest.raises(GenreclfError):
        M.top_level_accuracy(s, is_top, np.array([1, 0, 0, 0, 0]))  # column 1 is not top-level


def test_bad_inputs_raise_genreclf_error() -> None:
    with pytest.raises(GenreclfError):
        M.tagging_metrics(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(GenreclfError):
        M.ap_macro(np.full((3, 2), 2), np.zeros((3, 2)))
    with pytest.raises(GenreclfError):
        M.ap_macro(np.ones((3, 2)), np.full((3, 2), np.nan))
    with pytest.raises(GenreclfError):
        M.bootstrap_ci(np.ones((3, 2)), np.zeros((3, 2)), "accuracy")
