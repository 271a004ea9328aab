"""Hierarchy-aware evaluation on the synthetic corpus: per-level metrics, consistent scores, and models trained on
one label set (genres, genres_all) scored against the other, through evaluate, report and the command line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from genreclf.cli import main
from genreclf.config import FitConfig, TrainConfig
from genreclf.evaluate import evaluate
from genreclf.featurize import featurize
from genreclf.hierarchy import GenreTree, make_consistent
from genreclf.metadata import load_fma
from genreclf.metrics import SUMMARY, tagging_metrics
from genreclf.report import build_report
from genreclf.store import FeatureStore
from genreclf.train import train

PART = "training"  # ~23 tracks where the test part has 3: the numbers are checked, not the model's skill


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store_all(corpus, tmp_path_factory) -> Path:
    """The feature store of `corpus` with genres_all labels."""
    out = tmp_path_factory.mktemp("store_all") / "store"
    featurize(corpus, out, labels="genres_all", workers=2, progress=False)
    return out


@pytest.fixture(scope="module")
def runs(store_dir, store_all, tmp_path_factory) -> dict[str, Path]:
    """One-epoch GRUs trained on genres and on genres_all."""
    root = tmp_path_factory.mktemp("runs")
    for labels, store in (("genres", store_dir), ("genres_all", store_all)):
        fit = FitConfig(model="gru", epochs=1, batch_size=8, workers=0)
        train(store, root / labels, fit, TrainConfig(lr=1e-3), progress=False)
    return {"genres": root / "genres", "genres_all": root / "genres_all"}


def fma_targets(corpus: Path, labels: str, track_ids: np.ndarray) -> np.ndarray:
    """The targets tracks.csv's `labels` column gives these tracks."""
    fma = load_fma(corpus / "fma_metadata", labels=labels)
    return fma.targets[fma.row_of(track_ids)]


def npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return dict(f)


def test_per_level_metrics_are_those_of_each_level_s_columns(runs, store_dir, tmp_path):
    result = evaluate(runs["genres"], store_dir, part=PART, out=tmp_path / "metrics.json", progress=False)
    p = npz(tmp_path / "predictions.npz")
    tree = GenreTree.from_ids(FeatureStore.open(store_dir).genre_ids, FeatureStore.open(store_dir).header.genre_parents)
    levels = result["levels"]
    assert [lv["depth"] for lv in levels] == [None, 1, 2, 3, 4, 5]
    assert [lv["n_genres"] for lv in levels] == [163, 16, 106, 37, 3, 1]
    for key in (*SUMMARY, *(f"chance_{m}" for m in SUMMARY), "n_genres_ap", "n_positive_pairs"):
        assert levels[0][key] == result["metrics"][key], key  # "all genres" is today's numbers, unchanged
    for level in levels[1:]:
        cols = np.flatnonzero(tree.depth == level["depth"])
        expected = tagging_metrics(p["y_true"][:, cols], p["scores"][:, cols], prior=p["prior"][cols])
        for key in (*SUMMARY, "chance_ap_weighted", "random_ap_macro", "n_genres_ap"):
            assert level[key] == expected[key], (level["depth"], key)
    # The chance level of AP is the prevalence of each genre with a positive.
    roots = tree.roots
    present = p["y_true"][:, roots].sum(0) > 0
    assert present.any() and not present.all()
    assert levels[1]["chance_ap_macro"] == pytest.approx(p["y_true"][:, roots].mean(0)[present].mean(), abs=1e-12)
    assert result["labels"]["trained"] == result["labels"]["targets"] == "genres" and result["consistent"] is False


def test_a_genres_model_against_genres_all_targets_and_consistent_scores(runs, store_dir, corpus, tmp_path):
    plain = evaluate(runs["genres"], store_dir, part=PART, out=tmp_path / "plain" / "metrics.json", progress=False)
    cross = evaluate(
        runs["genres"],
        store_dir,
        part=PART,
        targets="genres_all",
        consistent=True,
        out=tmp_path / "cross" / "metrics.json",
        progress=False,
    )
    a, b = npz(tmp_path / "plain" / "predictions.npz"), npz(tmp_path / "cross" / "predictions.npz")
    assert np.array_equal(a["track_ids"], b["track_ids"])
    # Derived genres_all targets are tracks.csv's own genres_all column.
    assert np.array_equal(b["y_true"], fma_targets(corpus, "genres_all", b["track_ids"]))
    assert not np.array_equal(a["y_true"], b["y_true"])
    store = FeatureStore.open(store_dir)
    tree = GenreTree.from_ids(store.genre_ids, store.header.genre_parents)
    np.testing.assert_array_equal(b["scores"], make_consistent(a["scores"], tree))
    assert tree.is_consistent(b["scores"]) and not tree.is_consistent(a["scores"])
    assert cross["labels"] == {
        "trained": "genres",
        "targets": "genres_all",
        "store": "genres",
        "targets_from": cross["labels"]["targets_from"],
    }
    assert "ancestors" in cross["labels"]["targets_from"] and cross["consistent"] is True
    assert "subtree" in cross["consistency_rule"] and plain["consistency_rule"] is None
    assert cross["metrics"]["ap_weighted"] != plain["metrics"]["ap_weighted"]
    # Top-level accuracy compares genre_top with the top-level scores, which max-propagation raises.
    assert cross["top_level_accuracy"]["n_tracks"] == plain["top_level_accuracy"]["n_tracks"]


def test_a_genres_all_model_against_genres_and_back(runs, store_dir, store_all, corpus, tmp_path, caplog):
    model = runs["genres_all"]
    own = evaluate(model, store_all, part=PART, progress=False)
    back = evaluate(model, store_all, part=PART, targets="genres", out=tmp_path / "metrics.json", progress=False)
    y = npz(tmp_path / "predictions.npz")
    assert own["labels"]["targets"] == "genres_all" and back["labels"]["targets"] == "genres"
    assert back["labels"]["trained"] == "genres_all" and "most specific" in back["labels"]["targets_from"]
    fma_genres = fma_targets(corpus, "genres", y["track_ids"])
    tree = GenreTree.of(load_fma(corpus / "fma_metadata").vocabulary)
    assert np.array_equal(y["y_true"], tree.most_specific(fma_targets(corpus, "genres_all", y["track_ids"])))
    assert (y["y_true"] <= fma_genres).all()  # the derived genres only miss tags of an ancestor, never add one
    # A genres store holds the exact genres: scored against it, the model's labels differ from the store's.
    with caplog.at_level(logging.WARNING, logger="genreclf.evaluate"):
        on_genres = evaluate(model, store_dir, part=PART, progress=False)
    assert on_genres["labels"] == {**on_genres["labels"], "trained": "genres_all", "targets": "genres"}
    assert "trained on genres_all labels but store" in caplog.text


def test_the_report_says_what_was_scored_against_what_and_shows_every_level(runs, store_dir, tmp_path):
    run = runs["genres"]
    plain = build_report([run], tmp_path / "plain", n_boot=50, progress=False)
    text = plain.markdown.read_text()
    assert "## Per level of the genre tree" in text and "evaluated against `genres_all`" not in text
    assert "| level 1 (top-level) |" in text and "| level 5 |" in text
    assert "Scores made hierarchy-consistent" not in text
    assert "trained on `genres`, evaluated against `genres` targets; scores as the model gives them" in text
    summary = plain.summary["runs"][0]
    assert summary["levels"][0]["ap_weighted"] == pytest.approx(summary["metrics"]["ap_weighted"]["value"])
    assert summary["scoring"]["consistent"] is False

    cross = build_report([run], tmp_path / "cross", n_boot=50, progress=False, targets="genres_all", consistent=True)
    text = cross.markdown.read_text()
    assert "Trained on `genres`, evaluated against `genres_all` targets: derived from the store's genres" in text
    assert "Scores made hierarchy-consistent before any metric: max over descendants" in text
    evaluated = json.loads((run / "metrics.json").read_text())
    assert evaluated["labels"]["targets"] == "genres_all" and evaluated["consistent"] is True
    # Without options the report keeps that evaluation; asking otherwise evaluates again.
    kept = build_report([run], tmp_path / "kept", n_boot=50, progress=False)
    assert kept.summary["runs"][0]["scoring"]["targets"] == "genres_all"
    again = build_report([run], tmp_path / "again", n_boot=50, progress=False, targets="genres", consistent=False)
    assert again.summary["runs"][0]["scoring"] == {**again.summary["runs"][0]["scoring"], "targets": "genres"}
    assert again.summary["runs"][0]["levels"] == plain.summary["runs"][0]["levels"]


def test_the_command_line_scores_across_label_sets(runs, store_dir, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    args = ["-q", "evaluate", str(runs["genres"]), "--store", str(store_dir), "--part", PART, "--out", str(out)]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "top-level (" in table and "level 5 (0/1)" in table and "evaluated against" not in table
    assert main([*args, "--targets", "genres_all", "--consistent"]) == 0
    table = capsys.readouterr().out
    assert "(trained on genres, evaluated against genres_all targets (derived from the store's genres); " in table
    assert "hierarchy-consistent" in table
    result = json.loads(out.read_text())
    assert result["labels"]["targets"] == "genres_all" and result["consistent"] is True
    with pytest.raises(SystemExit):  # argparse refuses it, with the choices
        main([*args, "--targets", "tags"])
    assert "choose from 'genres', 'genres_all'" in capsys.readouterr().err
