"""The report: real tiny GRU and Transformer runs on the synthetic corpus, and known-answer cases."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from genreclf.errors import GenreclfError
from genreclf.lightning_modules import TrainConfig
from genreclf.metrics import average_precision, bootstrap_ci
from genreclf.modelfile import ModelFile
from genreclf.report import build_report, learning_curve, load_run
from genreclf.report_figures import pr_curve
from genreclf.train import FitConfig, train

N_BOOT = 200
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a loaded 2-core machine, 2 threads make GRU inference 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(store_dir, tmp_path_factory) -> dict[str, Path]:
    """One-epoch GRU and Transformer runs on the official split (not yet evaluated)."""
    root = tmp_path_factory.mktemp("runs")
    for kind in ("gru", "transformer"):
        train(store_dir, root / kind, FitConfig(model=kind, epochs=1, batch_size=8, workers=0), TrainConfig(lr=1e-3),
              progress=False)
    return {"gru": root / "gru", "transformer": root / "transformer"}


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    """The report of both runs; evaluates them first, as neither has metrics.json yet."""
    return build_report([runs["gru"], runs["transformer"]], tmp_path_factory.mktemp("report"), n_boot=N_BOOT,
                        progress=False)


def copy_run(src: Path, dst: Path, **provenance: object) -> Path:
    """Copy a run folder; rewrite its model file with changed provenance if any is given."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints"))
    if provenance:
        model = ModelFile.load(dst / "model.safetensors")
        model.provenance = {**model.provenance, **provenance}
        model.save(dst / "model.safetensors")
    return dst


def predictions(run: Path) -> dict[str, np.ndarray]:
    with np.load(run / "predictions.npz") as npz:
        return dict(npz)


def test_report_writes_every_figure_and_says_what_it_measured(report, runs):
    assert report.markdown.is_file() and report.json.is_file()
    names = {f.name for f in report.figures}
    assert names == {"metrics.png", "per_genre_ap_official.png", "pr_curves_official.png", "learning_curves.png"}
    md = report.markdown.read_text()
    for f in report.figures:
        data = f.read_bytes()
        assert data.startswith(PNG) and len(data) > 1000
        assert f"]({f.name})" in md
    summary = json.loads(report.json.read_text())
    assert summary["figures"] == [f.name for f in report.figures]
    prov = ModelFile.load(runs["gru"] / "model.safetensors").provenance
    ev = json.loads((runs["gru"] / "metrics.json").read_text())
    row = next(line for line in md.splitlines() if line.startswith("| gru |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # run, model, parameters, epochs, trained split, evaluated split, tracks, failed, labels, subset, git, date
    assert cells[4:11] == ["official", "official", str(ev["n_tracks"]), str(ev["n_failed_in_store"]),
                           prov["labels"], prov["subset"], prov["git"]]
    assert prov["store"] in md
    for section in ("top-level genre accuracy", "majority-class baseline", "crop averaging", "Paired differences",
                    "Learning curves", "Precision-recall curves"):
        assert section in md
    assert f"Caution: {ev['n_tracks']} test tracks." in md  # few tracks: averaged per-genre AP is biased upward


def test_intervals_and_chance_levels_come_from_metrics(report, runs):
    p = predictions(runs["transformer"])
    y = p["y_true"]
    rec = next(r for r in report.summary["runs"] if r["name"] == "transformer")
    for metric in ("ap_weighted", "ap_micro", "ap_macro", "roc_auc_macro"):
        point, low, high = bootstrap_ci(y, p["scores"], metric, n_boot=N_BOOT, seed=0)
        m = rec["metrics"][metric]
        assert (m["value"], m["low"], m["high"]) == pytest.approx((point, low, high), abs=1e-12)
        assert m["low"] <= m["value"] <= m["high"]
    support = y.sum(0)
    prevalence = support[support > 0] / len(y)
    assert rec["metrics"]["ap_macro"]["chance"] == pytest.approx(prevalence.mean())
    assert rec["metrics"]["ap_weighted"]["chance"] == pytest.approx(
        (support[support > 0] * prevalence).sum() / support.sum())
    assert rec["metrics"]["roc_auc_macro"]["chance"] == 0.5
    group = report.summary["groups"][0]
    assert group["runs"] == ["gru", "transformer"] and group["n_tracks"] == len(y)
    assert [c["metric"] for c in group["comparisons"]] == ["ap_weighted", "ap_micro", "ap_macro", "roc_auc_macro"]
    assert all(c["run"] == "transformer" and c["baseline"] == "gru" for c in group["comparisons"])
    supports = [r["support"] for r in group["per_genre"]]
    assert supports == sorted(supports, reverse=True) and min(supports) > 0
    assert len(supports) == int((support > 0).sum())


def test_identical_runs_differ_by_exactly_zero(report, runs, tmp_path):
    twin = copy_run(runs["gru"], tmp_path / "gru_twin")
    out = build_report([runs["gru"], twin], tmp_path / "out", n_boot=N_BOOT, progress=False)
    comparisons = out.summary["groups"][0]["comparisons"]
    assert len(comparisons) == 4
    for c in comparisons:
        if c["value_run"] is not None:
            assert (c["diff"], c["low"], c["high"]) == (0.0, 0.0, 0.0)
            assert not c["excludes_zero"]
    assert "the interval includes 0: no clear difference" in out.markdown.read_text()


def test_a_perfect_model_has_ap_interval_one_one(report, runs, tmp_path):
    perfect = copy_run(runs["transformer"], tmp_path / "perfect")
    p = predictions(perfect)
    p["scores"] = p["y_true"].astype(np.float32)
    np.savez_compressed(perfect / "predictions.npz", **p)
    out = build_report([runs["gru"], perfect], tmp_path / "out", n_boot=N_BOOT, progress=False)
    rec = out.summary["runs"][1]
    for metric in ("ap_weighted", "ap_micro", "ap_macro", "roc_auc_macro"):
        assert (rec["metrics"][metric]["low"], rec["metrics"][metric]["high"]) == (1.0, 1.0), metric


@pytest.fixture(scope="module")
def leaky(report, runs, tmp_path_factory):
    """A run trained on the reference split (seed 1), reported with the official-split runs."""
    root = tmp_path_factory.mktemp("leaky")
    fit = ModelFile.load(runs["transformer"] / "model.safetensors").provenance["fit"]
    run = copy_run(runs["transformer"], root / "transformer_reference", split="reference", fit={**fit, "seed": 1})
    return run, build_report([runs["gru"], runs["transformer"], run], root / "out", n_boot=N_BOOT, progress=False)


@pytest.fixture(scope="module")
def overridden(report, runs, tmp_path_factory):
    """An official-split run reported with --split reference."""
    root = tmp_path_factory.mktemp("overridden")
    run = copy_run(runs["gru"], root / "gru")
    return run, build_report([run], root / "out", split="reference", n_boot=N_BOOT, pr_genres=["Chiptune"],
                             progress=False)


def test_runs_on_different_splits_form_separate_groups(leaky):
    run, out = leaky
    groups = {g["split"]: g for g in out.summary["groups"]}
    assert groups["official"]["runs"] == ["gru", "transformer"]
    assert groups["reference"]["runs"] == ["transformer_reference"] and groups["reference"]["comparisons"] == []
    assert json.loads((run / "metrics.json").read_text())["split"] == "reference"  # re-evaluated
    names = {f.name for f in out.figures}
    assert {"per_genre_ap_reference.png", "per_genre_ap_official.png"} <= names
    md = out.markdown.read_text()
    assert "not compared pairwise" in md and "Warning" not in md


def test_split_override_reevaluates_and_warns(overridden):
    run, out = overridden
    assert out.summary["runs"][0]["evaluated_split"] == "reference"
    assert json.loads((run / "metrics.json").read_text())["split"] == "reference"
    assert "trained on the official split but evaluated on the reference split" in out.markdown.read_text()
    assert out.summary["groups"][0]["pr_genres"] in (["Chiptune"], [])


def test_different_track_sets_are_refused(leaky, overridden, tmp_path):
    # Both were evaluated on the reference split, with split seeds 1 and 0: other test tracks.
    with pytest.raises(GenreclfError, match="different tracks"):
        build_report([overridden[0], leaky[0]], tmp_path / "out", split="reference", n_boot=N_BOOT, progress=False)


def test_a_run_whose_store_is_gone(report, runs, tmp_path):
    moved = copy_run(runs["gru"], tmp_path / "moved", store=str(tmp_path / "no_store"))
    with pytest.raises(GenreclfError, match="--store"):  # the model is newer than its evaluation
        load_run(moved, progress=False)
    later = (moved / "model.safetensors").stat().st_mtime + 1
    for name in ("metrics.json", "predictions.npz"):
        os.utime(moved / name, (later, later))
    run = load_run(moved, progress=False)
    assert not run.checked and run.split == "official"


def test_user_errors(report, runs, tmp_path):
    with pytest.raises(GenreclfError, match="model.safetensors"):
        build_report([tmp_path], tmp_path / "out", n_boot=N_BOOT)
    with pytest.raises(GenreclfError, match="unknown genre"):
        build_report([runs["gru"]], tmp_path / "out", n_boot=N_BOOT, pr_genres=["Not A Genre"], progress=False)
    with pytest.raises(GenreclfError, match="bootstrap"):
        build_report([runs["gru"]], tmp_path / "out", n_boot=0)
    with pytest.raises(GenreclfError, match="at least one run"):
        build_report([], tmp_path / "out")


def test_learning_curve_groups_rows_by_epoch(tmp_path):
    csv = tmp_path / "metrics.csv"
    pd.DataFrame({"epoch": [0, 0, 1, 1], "step": [3, 3, 7, 7], "train_loss": [0.5, None, 0.3, None],
                  "val_loss": [None, 0.6, None, 0.4], "lr": [1e-3, None, 1e-3, None]}).to_csv(csv, index=False)
    curve = learning_curve(csv)
    assert curve["epoch"].tolist() == [0, 1]
    assert curve["train_loss"].tolist() == [0.5, 0.3] and curve["val_loss"].tolist() == [0.6, 0.4]
    assert learning_curve(tmp_path / "missing.csv") is None


def test_pr_curve_area_is_average_precision():
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.2
    s = np.round(rng.random(200) + 0.3 * y, 1)  # many ties
    recall, precision = pr_curve(y, s)
    assert recall[0] == 0 and recall[-1] == 1 and precision[0] == 1
    assert np.sum(np.diff(recall) * precision[1:]) == pytest.approx(average_precision(y, s), abs=1e-12)
