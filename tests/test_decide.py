"""Decision thresholds: known F1 optima worked out by hand, ties, rare genres and the genre tree."""

import numpy as np
import pytest

from genreclf.decide import FIXED_THRESHOLD, Decision, choose_thresholds, f1_at, f1_optimal_threshold
from genreclf.errors import GenreclfError


def test_the_f1_optimal_threshold_of_a_worked_example():
    # Accepting the top 1, 2, 3, 4, 5 scores: F1 = 2TP / (accepted + positives) = 2/3, 2/4, 4/5, 4/6, 4/7.
    threshold, f1 = f1_optimal_threshold(np.array([0.9, 0.8, 0.7, 0.6, 0.1]), np.array([1, 0, 1, 0, 0]))
    assert f1 == pytest.approx(0.8) and threshold == pytest.approx(0.65)  # midway between 0.7 (in) and 0.6 (out)
    # Every track accepted (F1 2*2/(3+2) = 0.8 beats 2/(2+2) for the top two): half the lowest score.
    threshold, f1 = f1_optimal_threshold(np.array([0.5, 0.5, 0.2]), np.array([1, 0, 1]))
    assert f1 == pytest.approx(0.8) and threshold == pytest.approx(0.1)


def test_ties_are_broken_towards_the_higher_threshold_and_tied_scores_are_never_split():
    # Top 1: 2/3; top 4: 4/6 = 2/3 as well; the fewer claims win.
    threshold, f1 = f1_optimal_threshold(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 0, 1]))
    assert f1 == 2 / 3 and threshold == pytest.approx(0.85)
    # Tied scores are one group: cutting inside it (the positive first by order) would claim F1 1.
    threshold, f1 = f1_optimal_threshold(np.array([0.6, 0.6, 0.3, 0.3]), np.array([1, 0, 0, 0]))
    assert f1 == pytest.approx(2 / 3) and threshold == pytest.approx(0.45)  # {0.6, 0.6}: 2/(2+1)
    threshold, f1 = f1_optimal_threshold(np.array([0.6, 0.6, 0.6]), np.array([0, 1, 0]))
    assert f1 == pytest.approx(0.5) and threshold == pytest.approx(0.3)


def test_no_positives_gives_no_threshold():
    threshold, f1 = f1_optimal_threshold(np.array([0.9, 0.1]), np.array([0, 0]))
    assert np.isnan(threshold) and np.isnan(f1)


def test_rare_genres_take_the_pooled_threshold():
    probabilities = np.array(
        [
            [0.9, 0.2, 0.6, 0.4],
            [0.8, 0.3, 0.1, 0.3],
            [0.1, 0.7, 0.4, 0.2],
            [0.3, 0.1, 0.2, 0.1],
        ]
    )
    targets = np.array([[1, 0, 0, 0], [1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    t = choose_thresholds(probabilities, targets, min_positives=2)
    # Pooled: 16 pairs, 4 positives; the top 3 scores (0.9, 0.8, 0.7) are all positives: F1 6/7.
    assert t.global_threshold == pytest.approx(0.65)
    assert t.chosen_by == ["genre", "global", "global", "global"] and t.positives.tolist() == [2, 1, 1, 0]
    assert t.values[0] == pytest.approx(0.55)  # genre 0: its two positives 0.9, 0.8 above 0.3
    np.testing.assert_allclose(t.values[1:], 0.65)
    np.testing.assert_allclose(t.f1[:3], [1.0, 1.0, 0.0])
    assert np.isnan(t.f1[3])  # a genre without positives has no F1
    d = t.to_dict()
    assert d["values"][0] == pytest.approx(0.55) and d["f1"][3] is None and "fewer than 2" in d["rule"]
    # With the default rule (10 positives) every genre here is rare.
    assert choose_thresholds(probabilities, targets).chosen_by == ["global"] * 4


def test_without_any_positive_every_genre_takes_the_fixed_threshold():
    t = choose_thresholds(np.array([[0.9, 0.2], [0.1, 0.7]]), np.zeros((2, 2)))
    assert t.chosen_by == ["fixed", "fixed"] and t.values.tolist() == [FIXED_THRESHOLD] * 2
    with pytest.raises(GenreclfError, match="no validation tracks"):
        choose_thresholds(np.zeros((0, 2)), np.zeros((0, 2)))
    with pytest.raises(GenreclfError, match="must both be"):
        choose_thresholds(np.zeros((2, 2)), np.zeros((2, 3)))


def test_f1_at_counts_scores_equal_to_the_threshold_as_chosen():
    np.testing.assert_allclose(f1_at(np.array([[0.5], [0.4]]), np.array([[1], [0]]), np.array([0.5])), [1.0])


def test_decisions_per_genre_global_and_with_ancestors():
    # FMA's ids: Rock 12, Metal 31 (parent Rock), Death-Metal 101 (parent Metal), Jazz 4 (a root).
    decision = Decision.of([4, 12, 31, 101], [0, 0, 12, 31], {"values": [0.5, 0.9, 0.3, 0.2]})
    p = np.array([0.6, 0.1, 0.25, 0.4])
    assert decision.chosen(p) == [0, 3]  # Jazz 0.6 >= 0.5, Death-Metal 0.4 >= 0.2: most probable first
    assert decision.chosen(p, with_parents=True) == [0, 3, 2, 1]  # then Metal and Rock
    assert decision.chosen(p, threshold=0.25) == [0, 3, 2]  # >= counts: 0.25 is chosen
    assert decision.chosen(p, threshold=0.25, with_parents=True) == [0, 3, 2, 1]  # Metal already there
    with pytest.raises(GenreclfError, match="genreclf calibrate"):
        Decision.of([4], [], None).chosen(np.array([0.9]))
    assert Decision.of([4], [], None).chosen(np.array([0.9]), threshold=0.5) == [0]
    with pytest.raises(GenreclfError, match="genre tree"):
        Decision.of([4], [], {"values": [0.5]}).chosen(np.array([0.9]), with_parents=True)
