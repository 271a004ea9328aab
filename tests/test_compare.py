"""`genreclf compare`: real tiny runs of 2 models x 2 seeds, resuming, and intervals with known answers."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import t as student_t

from genreclf.cli import build_parser, main
from genreclf.compare import compare_models, run_name
from genreclf.compare_stats import model_summary, pair_summary, resample, summarise
from genreclf.config import FitConfig, TrainConfig
from genreclf.errors import GenreclfError
from genreclf.metrics import SUMMARY, ap_weighted, bootstrap_ci
from genreclf.modelfile import ModelFile
from genreclf.train import train

FIT = FitConfig(epochs=2, batch_size=8, workers=0, accelerator="cpu")
OPTIM = TrainConfig(lr=1e-3)
N_BOOT = 100
RUNS = [run_name(m, k) for m in ("gru", "transformer") for k in (0, 1)]
PNG = b"\x89PNG\r\n\x1a\n"
FOCAL = {"loss": "focal", "focal_gamma": 2.0, "focal_alpha": 0.25}
BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "interval_coverage.py"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def compared(store_dir, tmp_path_factory):
    """A compare of 2 models x 2 seeds that finds transformer-seed1 as a killed compare leaves it: one epoch done."""
    out = tmp_path_factory.mktemp("compare")
    partial = out / "runs" / "transformer-seed1"
    train(store_dir, partial, dataclasses.replace(FIT, model="transformer", seed=1, epochs=1), OPTIM, progress=False)
    for name in ("model.safetensors", "train.json"):  # killed after its first epoch's checkpoint
        (partial / name).unlink()
    first_epoch = pd.read_csv(partial / "logs" / "metrics.csv")
    result = compare_models(store_dir, out, seeds=2, fit=FIT, optim=OPTIM, n_boot=N_BOOT, progress=False)
    return out, result, first_epoch


def test_every_model_and_seed_is_an_evaluated_run_folder(compared):
    out, result, _ = compared
    assert result.trained == RUNS
    for name in RUNS:
        run = out / "runs" / name
        for file in ("model.safetensors", "train.json", "settings.json", "metrics.json", "predictions.npz"):
            assert (run / file).is_file(), (name, file)
        fit = ModelFile.load(run / "model.safetensors").provenance["fit"]
        assert f"{fit['model']}-seed{fit['seed']}" == name and fit["epochs"] == FIT.epochs
        assert json.loads((run / "metrics.json").read_text())["split"] == "official"
    tracks = {name: np.load(out / "runs" / name / "predictions.npz")["track_ids"].tolist() for name in RUNS}
    assert all(t == tracks[RUNS[0]] for t in tracks.values())  # every run scored on the same test tracks


def test_the_report_holds_means_over_seeds_intervals_and_verdicts(compared):
    out, result, _ = compared
    assert result.markdown.is_file() and result.json.is_file()
    assert result.figure.read_bytes().startswith(PNG)
    summary = json.loads(result.json.read_text())
    assert summary == result.summary
    assert summary["models"] == ["gru", "transformer"] and summary["seeds"] == [0, 1]
    evaluations = {n: json.loads((out / "runs" / n / "metrics.json").read_text()) for n in RUNS}
    predictions = {n: np.load(out / "runs" / n / "predictions.npz") for n in RUNS}
    y = predictions[RUNS[0]]["y_true"]
    md = result.markdown.read_text()
    for metric in SUMMARY:
        block = summary["metrics"][metric]
        assert [m["model"] for m in block["models"]] == ["gru", "transformer"]
        for m in block["models"]:
            names = [run_name(m["model"], k) for k in (0, 1)]
            values = [evaluations[n]["metrics"][metric] for n in names]
            assert m["mean"] == pytest.approx(np.mean(values)) and m["sd"] == pytest.approx(np.std(values, ddof=1))
            assert 0.0 <= m["low"] <= m["mean"] <= m["high"] <= 1.0
            for n, seed in zip(names, m["per_seed"]):  # each seed's interval is the report's for a single run
                point, low, high = bootstrap_ci(y, predictions[n]["scores"], metric, n_boot=N_BOOT, seed=0)
                assert (seed["value"], seed["low"], seed["high"]) == pytest.approx((point, low, high), abs=1e-12)
        (pair,) = block["pairs"]
        assert (pair["a"], pair["b"]) == ("transformer", "gru")
        assert pair["diff"] == pytest.approx(block["models"][1]["mean"] - block["models"][0]["mean"])
        assert pair["low"] <= pair["diff"] <= pair["high"]
        assert f"`{metric}`: {pair['verdict']}" in md
    for section in ("## Verdict", "## Per model", "## Differences", "## How the intervals are made", "## Runs"):
        assert section in md
    assert f"Caution: {summary['n_tracks']} test tracks." in md


def test_an_unfinished_run_is_resumed_not_restarted(compared):
    out, _, first_epoch = compared
    run = out / "runs" / "transformer-seed1"
    logged = pd.read_csv(run / "logs" / "metrics.csv")
    assert logged["epoch"].tolist() == [0, 1]
    pd.testing.assert_frame_equal(logged.iloc[:1], first_epoch)  # epoch 0 kept as it was, epoch 1 added
    assert json.loads((run / "train.json").read_text())["epochs"] == 2


def test_a_second_compare_trains_and_evaluates_nothing(compared, store_dir, capsys):
    out, result, _ = compared
    files = [out / "runs" / n / f for n in RUNS for f in ("model.safetensors", "metrics.json", "predictions.npz")]
    before = [f.stat().st_mtime_ns for f in files]
    again = compare_models(store_dir, out, seeds=2, fit=FIT, optim=OPTIM, n_boot=N_BOOT, progress=False)
    assert again.trained == []
    assert [f.stat().st_mtime_ns for f in files] == before
    assert again.summary["metrics"] == result.summary["metrics"]  # the same resamples: the same numbers
    # The command line with the same settings finds the same runs finished.
    args = ["--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--workers", "0", "--accelerator", "cpu"]
    code = main(["-q", "compare", "--store", str(store_dir), "--out", str(out), "--seeds", "2", *args])
    assert code == 0
    printed = capsys.readouterr().out
    assert "0 run(s) trained this time" in printed and "ap_weighted: " in printed
    assert [f.stat().st_mtime_ns for f in files] == before


def test_runs_trained_otherwise_are_refused(compared, store_dir):
    out, _, _ = compared
    model = out / "runs" / "gru-seed0" / "model.safetensors"
    before = model.stat().st_mtime_ns
    with pytest.raises(GenreclfError, match="trained with epochs=2, not 3") as err:
        compare_models(store_dir, out, seeds=2, fit=dataclasses.replace(FIT, epochs=3), optim=OPTIM, progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(GenreclfError, match="was started with optimiser"):
        compare_models(store_dir, out, seeds=2, fit=FIT, optim=TrainConfig(lr=2e-3), progress=False)
    assert model.stat().st_mtime_ns == before


def test_losses_are_compared_as_variants_of_each_model(store_dir, tmp_path, capsys):
    out = tmp_path / "losses"
    args = ["--epochs", "1", "--batch-size", "8", "--lr", "1e-3", "--workers", "0", "--accelerator", "cpu"]
    command = ["-q", "compare", "--store", str(store_dir), "--out", str(out), "--seeds", "2", "--n-boot", "20"]
    command += ["--models", "gru", "--losses", "bce", "focal", "--focal-gamma", "1", *args]
    assert main(command) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert summary["models"] == ["gru-bce", "gru-focal"]
    assert summary["losses"] == {"bce": {"loss": "bce", "pos_weight": 4.0}, "focal": {**FOCAL, "focal_gamma": 1.0}}
    recorded = {r["name"]: r["loss"] for r in summary["runs"]}
    assert recorded == {
        "gru-bce-seed0": "bce",
        "gru-bce-seed1": "bce",
        "gru-focal-seed0": "focal",
        "gru-focal-seed1": "focal",
    }
    assert ModelFile.load(out / "runs" / "gru-focal-seed1" / "model.safetensors").loss == {**FOCAL, "focal_gamma": 1.0}
    pair = summary["metrics"]["ap_weighted"]["pairs"][0]
    assert {pair["a"], pair["b"]} == {"gru-bce", "gru-focal"}
    assert "| gru | focal | 1 |" in (out / "compare.md").read_text()
    capsys.readouterr()
    # A parameter of a loss not compared would do nothing: refused, as train refuses it.
    assert main([*command, "--asl-clip", "0.1"]) == 2
    assert "--asl-clip is a parameter of loss 'asymmetric', which --losses does not compare" in capsys.readouterr().err
    with pytest.raises(GenreclfError, match="a loss is given twice"):
        compare_models(store_dir, out, models=["gru"], seeds=2, optim=[OPTIM, OPTIM], progress=False)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seeds", "1"], "1 seed(s) per model: a standard deviation across seeds needs at least 2"),
        (["--seeds", "0"], "0 seed(s) per model: a standard deviation across seeds needs at least 2"),
        (["--models", "gru", "gru"], "model 'gru' is given twice"),
    ],
)
def test_bad_arguments_give_one_line_errors(store_dir, tmp_path, capsys, args, message):
    assert main(["-q", "compare", "--store", str(store_dir), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("genreclf: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()  # refused before anything was trained


def test_bad_api_arguments_and_unknown_models(store_dir, tmp_path, capsys):
    for kwargs, message in (
        ({"models": ["gru", "cnn"]}, "unknown model 'cnn'; use one of gru, transformer"),
        ({"models": []}, "at least one model"),
        ({"n_boot": 1}, "at least 2"),
        ({"fit": FitConfig(split="reference")}, "official split only"),
    ):
        with pytest.raises(GenreclfError, match=message):
            compare_models(store_dir, tmp_path / "out", **{"seeds": 2, **kwargs})
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--store", str(store_dir), "--out", str(tmp_path / "out"), "--models", "gru", "cnn"])
    assert exit_.value.code == 2 and "invalid choice: 'cnn'" in capsys.readouterr().err
    defaults = build_parser().parse_args(["compare", "--store", "s", "--out", "o"])
    fit, optim = FitConfig(), TrainConfig()
    assert (defaults.models, defaults.seeds, defaults.n_boot) == (["gru", "transformer"], 5, 1000)
    assert (defaults.epochs, defaults.batch_size, defaults.lr, defaults.workers) == (
        fit.epochs,
        fit.batch_size,
        optim.lr,
        fit.workers,
    )


# ---------------------------------------------------------------------------- intervals on made-up scores


def labels(n: int = 60, genres: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, genres)) < 0.3).astype(np.int8)
    y[np.arange(n), rng.integers(0, genres, n)] = 1
    return y


def noisy(y: np.ndarray, separation: float, seed: int) -> np.ndarray:
    return separation * y + np.random.default_rng(seed).normal(0, 1, y.shape)


def test_identical_models_differ_by_zero_with_an_interval_around_it():
    y = labels()
    runs = [noisy(y, 1.0, k) for k in range(3)]
    s = summarise(y, {"a": runs, "b": list(runs)}, "ap_weighted", n_boot=200)
    (pair,) = s["pairs"]
    assert pair["diff"] == 0.0 and pair["track_var"] == 0.0  # the same scores on every track resample
    assert pair["low"] == pytest.approx(-pair["high"]) and pair["low"] < 0 < pair["high"]
    assert (pair["tracks_only_low"], pair["tracks_only_high"]) == (0.0, 0.0)  # blind to the seeds
    assert not pair["excludes_zero"] and pair["verdict"].startswith("no clear difference between b and a")


def test_a_clearly_better_model_is_named():
    y = labels()
    s = summarise(
        y,
        {"weak": [noisy(y, 0.2, k) for k in range(3)], "strong": [noisy(y, 4.0, 10 + k) for k in range(3)]},
        "ap_weighted",
        n_boot=200,
    )
    (pair,) = s["pairs"]
    assert (pair["a"], pair["b"]) == ("strong", "weak")
    assert pair["low"] > 0 and pair["excludes_zero"]
    assert pair["verdict"].startswith("strong better than weak: strong − weak = +")
    assert pair["verdict"].endswith("the interval excludes 0")


def test_seed_spread_widens_the_interval_by_t_with_seeds_minus_one_df():
    y = labels()
    # Model a's seeds land far apart; b's close together. Tracks alone see neither spread.
    scores = {"a": [noisy(y, sep, k) for k, sep in enumerate((0.3, 2.5, 1.2))], "b": [noisy(y, 1.3, 5)] * 3}
    r = resample(y, scores, "ap_weighted", n_boot=300)
    values = {m: np.array([ap_weighted(y, s) for s in runs]) for m, runs in scores.items()}
    a = model_summary(r, "a")
    assert (a["mean"], a["sd"]) == pytest.approx((values["a"].mean(), values["a"].std(ddof=1)))
    assert a["seed_var"] == pytest.approx(values["a"].var(ddof=1) / 3)
    assert a["df"] == pytest.approx((a["seed_var"] + a["track_var"]) ** 2 / (a["seed_var"] ** 2 / 2))
    assert 2 <= a["df"] < 3  # nearly all of a's variance is the seeds': 2 degrees of freedom
    assert a["mean"] - a["low"] == pytest.approx(student_t.ppf(0.975, a["df"]) * a["se"])
    assert (a["mean"] - a["low"]) / a["se"] > 3  # not 1.96
    pair = pair_summary(r, "b", "a")
    assert pair["seed_var"] == pytest.approx(values["a"].var(ddof=1) / 3)  # b's three runs are one: no spread
    half = pair["high"] - pair["diff"]
    assert half == pytest.approx(student_t.ppf(0.975, pair["df"]) * pair["se"])
    assert pair["tracks_only_high"] - pair["tracks_only_low"] < (pair["high"] - pair["low"]) / 2
    # The two-stage bootstrap resamples the same seeds: its interval is wider than tracks alone, narrower than t.
    assert pair["two_stage_high"] - pair["two_stage_low"] < pair["high"] - pair["low"]


def test_one_seed_has_no_spread_to_report():
    y = labels()
    with pytest.raises(GenreclfError, match="needs at least 2"):
        resample(y, {"a": [noisy(y, 1.0, 0)], "b": [noisy(y, 1.0, 1), noisy(y, 1.0, 2)]}, "ap_weighted")


def test_the_coverage_simulation_runs_at_a_tiny_size():
    command = [sys.executable, str(BENCHMARK), "--mode", "seeds", "--sims", "4", "--boot", "30", "--sizes", "20"]
    command += ["--seeds", "2", "--metrics", "roc_auc_macro", "--population", "3000"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[1].split()[:3] == ["tracks", "seeds", "metric"]
    row = out[2].split()
    assert row[:3] == ["20", "2", "roc_auc_macro"] and len(row) == 14
    numbers = [float(x) for x in row[5:]]
    assert all(0.0 <= x <= 1.0 for x in numbers[:4] + numbers[-3:])  # coverages and the share of wins
    assert all(x >= 0 for x in numbers[4:6])  # widths
