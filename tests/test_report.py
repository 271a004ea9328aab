"""The report: real tiny GRU and Transformer runs on the synthetic corpus, and known-answer cases."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from genreclf.atomic import atomic_savez
from genreclf.config import FitConfig, TrainConfig
from genreclf.data import split_positions
from genreclf.errors import GenreclfError
from genreclf.evaluate import WHOLE_SEQUENCE_BUDGET, evaluate, predict_store, whole_sequence_batch, whole_sequence_bytes
from genreclf.metrics import average_precision, bootstrap_ci, tagging_metrics
from genreclf.modelfile import ModelFile
from genreclf.models import GRUConfig, TransformerConfig
from genreclf.report import build_report, learning_curve, load_run
from genreclf.report_figures import pr_curve
from genreclf.store import FeatureStore
from genreclf.train import EpochLog, train

N_BOOT = 200
PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def runs(store_dir, tmp_path_factory) -> dict[str, Path]:
    """One-epoch GRU and Transformer runs on the official split (not yet evaluated)."""
    root = tmp_path_factory.mktemp("runs")
    for kind in ("gru", "transformer"):
        train(
            store_dir,
            root / kind,
            FitConfig(model=kind, epochs=1, batch_size=8, workers=0),
            TrainConfig(lr=1e-3),
            progress=False,
        )
    return {"gru": root / "gru", "transformer": root / "transformer"}


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    """The report of both runs; evaluates them first, as neither has metrics.json yet."""
    return build_report(
        [runs["gru"], runs["transformer"]], tmp_path_factory.mktemp("report"), n_boot=N_BOOT, progress=False
    )


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
    assert cells[4:11] == [
        "official",
        "official",
        str(ev["n_tracks"]),
        str(ev["n_failed_in_store"]),
        prov["labels"],
        prov["subset"],
        prov["git"],
    ]
    assert prov["store"] in md
    for section in (
        "top-level genre accuracy",
        "majority-class baseline",
        "crop averaging",
        "Paired differences",
        "Learning curves",
        "Precision-recall curves",
    ):
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
        (support[support > 0] * prevalence).sum() / support.sum()
    )
    assert rec["metrics"]["roc_auc_macro"]["chance"] == 0.5
    n_present = int((support > 0).sum())  # the macro averages' fixed genre set, stated in metrics.json and the report
    assert (rec["macro_genres"]["ap_macro"], rec["macro_genres"]["of"]) == (n_present, y.shape[1])
    ev = json.loads((runs["transformer"] / "metrics.json").read_text())
    assert "with a positive in the full test set" in ev["metrics"]["macro_genre_set"]
    assert f"`ap_macro` over the {n_present} of the {y.shape[1]} genres" in report.markdown.read_text()
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


def reference_pr_genres(store_dir: Path) -> tuple[str, str]:
    """Return a genre with positives and one without among the reference split's (seed 0) test tracks."""
    store = FeatureStore.open(store_dir)
    support = store.targets[split_positions(store, "test", "reference", 0)].sum(0)
    present = [g for g, n in zip(store.genres, support) if n > 0]
    absent = [g for g, n in zip(store.genres, support) if n == 0]
    assert present and absent
    return present[-1], absent[0]


@pytest.fixture(scope="module")
def overridden(report, runs, store_dir, tmp_path_factory):
    """An official-split run reported with --split reference, asking for PR curves of an absent and a present genre."""
    root = tmp_path_factory.mktemp("overridden")
    run = copy_run(runs["gru"], root / "gru")
    present, absent = reference_pr_genres(store_dir)
    return run, build_report(
        [run], root / "out", split="reference", n_boot=N_BOOT, pr_genres=[absent, present], progress=False
    )


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


def test_pr_curves_are_drawn_for_the_asked_genres_with_test_positives(overridden, store_dir):
    present, absent = reference_pr_genres(store_dir)
    _, out = overridden
    assert out.summary["groups"][0]["pr_genres"] == [present]  # the absent genre has no curve to draw
    assert f"Reference split: {present}." in out.markdown.read_text()
    assert "pr_curves_reference.png" in out.summary["figures"]


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


def test_learning_curve_reads_the_training_log(report, runs, tmp_path):
    log_csv = runs["gru"] / "logs" / "metrics.csv"  # written by the real (one-epoch) training run
    with open(log_csv, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == EpochLog.COLUMNS and len(rows) == 1
    curve = learning_curve(log_csv)
    assert curve["epoch"].tolist() == [0]
    assert curve["train_loss"].tolist() == [float(rows[0]["train_loss"])]
    assert curve["val_loss"].tolist() == [float(rows[0]["val_loss"])]
    assert "learning_curves.png" in report.summary["figures"]
    # Three epochs as EpochLog writes them (a header, one line per epoch), then a line cut by a crash.
    values = [(0, 0.5, 0.6, 0.001, 1.5), (1, 0.3, 0.4, 0.001, 1.4), (2, 0.2, 0.35, 0.0005, 1.6)]
    lines = [",".join(EpochLog.COLUMNS)] + [",".join(str(v) for v in row) for row in values]
    longer = tmp_path / "metrics.csv"
    longer.write_text("\n".join(lines) + "\n3,0.1")
    curve = learning_curve(longer)
    assert curve["epoch"].tolist() == [0, 1, 2, 3]
    assert curve["train_loss"].tolist() == [0.5, 0.3, 0.2, 0.1] and curve["val_loss"].tolist()[:3] == [0.6, 0.4, 0.35]
    assert np.isnan(curve["val_loss"].iloc[3])
    assert learning_curve(tmp_path / "missing.csv") is None


def test_pr_curve_area_is_average_precision():
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.2
    s = np.round(rng.random(200) + 0.3 * y, 1)  # many ties
    recall, precision = pr_curve(y, s)
    assert recall[0] == 0 and recall[-1] == 1 and precision[0] == 1
    assert np.sum(np.diff(recall) * precision[1:]) == pytest.approx(average_precision(y, s), abs=1e-12)


def test_default_evaluation_scores_crops_only(report, runs):
    for run in runs.values():
        ev = json.loads((run / "metrics.json").read_text())
        assert "metrics_whole_sequence" not in ev and "whole_sequence" not in ev
        assert "scores_whole" not in predictions(run)
    assert all(r["crop_averaging"]["whole"] is None for r in report.summary["runs"])
    assert "Whole-sequence scores were not measured for gru, transformer" in report.markdown.read_text()


def test_whole_sequence_scores_are_batched_and_equal_one_batch(report, runs, store_dir, tmp_path):
    result = evaluate(
        runs["transformer"], store_dir, out=tmp_path / "metrics.json", progress=False, whole_sequence=True
    )
    store = FeatureStore.open(store_dir)
    positions = split_positions(store, "test", "official", 0)
    model_file = ModelFile.load(runs["transformer"] / "model.safetensors")
    one_batch = predict_store(model_file.model, store, positions, None, batch_size=len(positions))
    p = predictions(tmp_path)
    np.testing.assert_allclose(p["scores_whole"], one_batch, rtol=0, atol=1e-5)
    expected = tagging_metrics(p["y_true"], one_batch, store.genres, p["prior"])
    for key in ("ap_weighted", "ap_micro", "ap_macro", "roc_auc_macro"):
        assert result["metrics_whole_sequence"][key] == pytest.approx(expected[key], abs=1e-5)
    batch = result["whole_sequence"]["batch_size"]
    assert result["whole_sequence"]["frames"] == 938
    assert batch == whole_sequence_batch(model_file.config, 938) and 1 <= batch < len(positions)  # > 1 batch
    assert json.loads((tmp_path / "metrics.json").read_text())["whole_sequence"] == result["whole_sequence"]


def test_whole_sequence_batch_fits_the_memory_budget():
    transformer, gru = TransformerConfig(), GRUConfig()
    # The default Transformer's attention scores alone: 8 heads x 938^2 x 4 bytes = 28 MB per track and layer.
    assert whole_sequence_bytes(transformer, 938) > 8 * 938**2 * 4
    for cfg, frames in ((transformer, 938), (transformer, 256), (gru, 938), (gru, 256)):
        batch = whole_sequence_batch(cfg, frames)
        assert batch * whole_sequence_bytes(cfg, frames) <= WHOLE_SEQUENCE_BUDGET or batch == 1
        assert batch == 64 or (batch + 1) * whole_sequence_bytes(cfg, frames) > WHOLE_SEQUENCE_BUDGET
    assert whole_sequence_batch(transformer, 938) < 8 < whole_sequence_batch(gru, 938) < 64
    assert whole_sequence_batch(transformer, 4000) == 1 and whole_sequence_batch(gru, 10) == 64


MEASURE_PEAK = """
from pathlib import Path
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from genreclf.evaluate import whole_sequence_batch
from genreclf.models import TransformerConfig, TransformerTagger

def kib(field):
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith(field + ":"))

torch.set_num_threads(1)
batch = whole_sequence_batch(TransformerConfig(), 938)
model = TransformerTagger(TransformerConfig()).eval()
x, lengths = torch.randn(batch, 938, 128), torch.tensor([938] + [500] * (batch - 1))
with torch.no_grad():
    model(x[:, :8], lengths.clamp(max=8))  # allocator and kernels warmed up
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS (VmHWM) starts again from the current RSS
    before = kib("VmRSS")
    with sdpa_kernel(SDPBackend.MATH):  # the kernel that holds the attention scores
        model(x, lengths)
print(batch, (kib("VmHWM") - before) * 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_a_whole_sequence_batch_stays_within_the_budget_on_the_math_kernel():
    # A fixed mmap threshold makes glibc return freed tensors at once, so that RSS follows live memory.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", MEASURE_PEAK], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    batch, peak = (int(v) for v in out.stdout.split())
    assert 1 < batch < 64
    # Measured: ~64 MB per 938-frame track on the math kernel (4 GB at the old batch of 64); 92 MB estimated.
    assert 0.25 * batch * whole_sequence_bytes(TransformerConfig(), 938) < peak
    assert peak <= batch * whole_sequence_bytes(TransformerConfig(), 938) <= WHOLE_SEQUENCE_BUDGET


def test_a_report_with_whole_sequence_scores(report, runs, tmp_path):
    run = copy_run(runs["gru"], tmp_path / "gru")
    out = build_report([run], tmp_path / "out", n_boot=N_BOOT, progress=False, whole_sequence=True)
    assert "whole_sequence" in json.loads((run / "metrics.json").read_text())  # re-evaluated: asked for
    crop = out.summary["runs"][0]["crop_averaging"]
    assert set(crop["whole"]) == {"ap_weighted", "ap_micro", "ap_macro", "roc_auc_macro"}
    assert crop["ap_weighted_diff"]["n_boot"] == N_BOOT
    md = out.markdown.read_text()
    assert "| whole sequence | mean of crops |" in md and "not measured" not in md


def test_predictions_are_written_before_metrics(report, runs, tmp_path):
    for run in runs.values():  # metrics.json, the marker of a complete evaluation, comes last
        assert (run / "metrics.json").stat().st_mtime_ns >= (run / "predictions.npz").stat().st_mtime_ns
    # A failed predictions.npz write leaves no metrics.json (the old one is removed first) and no temporary file.
    run = copy_run(runs["gru"], tmp_path / "gru")
    (run / "predictions.npz").unlink()
    (run / "predictions.npz").mkdir()
    with pytest.raises(OSError):
        evaluate(
            run, ModelFile.load(run / "model.safetensors").provenance["store"], out=run / "metrics.json", progress=False
        )
    assert not (run / "metrics.json").exists()
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []


def test_a_corrupt_predictions_file_is_re_evaluated_or_refused(report, runs, tmp_path):
    run = copy_run(runs["gru"], tmp_path / "gru")
    good = (run / "predictions.npz").read_bytes()
    (run / "predictions.npz").write_bytes(good[: len(good) // 2])  # as a crash during a plain np.savez leaves it
    later = (run / "model.safetensors").stat().st_mtime + 1
    os.utime(run / "metrics.json", (later, later))
    loaded = load_run(run, progress=False)  # the store is there: evaluated again
    np.testing.assert_array_equal(loaded.predictions["scores"], predictions(runs["gru"])["scores"])
    moved = copy_run(runs["gru"], tmp_path / "moved", store=str(tmp_path / "no_store"))
    (moved / "predictions.npz").write_bytes(good[: len(good) // 2])
    later = (moved / "model.safetensors").stat().st_mtime + 1
    for name in ("metrics.json", "predictions.npz"):
        os.utime(moved / name, (later, later))
    with pytest.raises(GenreclfError, match="predictions.npz: unreadable") as error:
        load_run(moved, progress=False)
    assert "\n" not in str(error.value) and "--store" in str(error.value)


def test_atomic_savez_round_trips_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "p.npz"
    atomic_savez(path, a=np.arange(5), b=np.array(["x", "y"]))
    with np.load(path) as npz:
        assert npz["a"].tolist() == [0, 1, 2, 3, 4] and npz["b"].tolist() == ["x", "y"]
    assert [p.name for p in tmp_path.iterdir()] == ["p.npz"]


def test_the_report_does_not_import_lightning():
    code = (
        "import sys, genreclf.report, genreclf.evaluate; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
