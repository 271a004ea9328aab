"""The evaluation report: GRU vs Transformer with uncertainty, chance levels and provenance.

`build_report` reads each run's metrics.json and predictions.npz (making them with
genreclf.evaluate when they are missing, stale, or from another split or store) and writes

    OUT/report.md                 what was measured, metrics with 95% BCa bootstrap intervals and chance
                                  levels, paired differences, metrics per level of the genre tree (the 16
                                  top-level genres, their sub-genres, ...), top-level accuracy, crop averaging
                                  (against whole-sequence scores, where measured), per-genre table,
                                  and the figures below
    OUT/report.json               the same numbers, machine-readable
    OUT/metrics.png               summary metrics with intervals and chance levels, every run
    OUT/per_genre_ap_SPLIT.png    per-genre AP of the most frequent genres, runs side by side
    OUT/pr_curves_SPLIT.png       precision-recall curves of chosen genres, all runs per genre
    OUT/learning_curves.png       training and validation loss per epoch

Runs are grouped by the split they were evaluated on. Within a group every run must have
been scored on the same tracks, so differences are paired (same bootstrap resamples);
between groups (official vs the leaky reference split) only the numbers side by side are shown.
Each run's evaluation says which labels it was scored against (`targets`, e.g. genres_all for a model
trained on genres) and whether its scores were made hierarchy-consistent; the report says so too.
"""

from __future__ import annotations

import json
import logging
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from genreclf import __version__
from genreclf.atomic import atomic_write_text
from genreclf.config import SPLITS
from genreclf.data import split_positions
from genreclf.errors import GenreclfError, first_line
from genreclf.evaluate import evaluate, level_metrics, store_targets
from genreclf.hierarchy import GenreTree
from genreclf.metrics import (
    MACRO_GENRE_SET,
    SUMMARY,
    bootstrap_ci,
    paired_bootstrap_diff,
    per_genre_metrics,
    tagging_metrics,
)
from genreclf.modelfile import ModelFile
from genreclf.provenance import git_revision
from genreclf.report_figures import learning_curves_figure, metrics_figure, per_genre_figure, pr_figure
from genreclf.report_markdown import render
from genreclf.store import FeatureStore

log = logging.getLogger(__name__)

PART = "test"  # the report only ever measures the test part of a split
ALPHA = 0.05  # 95% intervals
BOOT_SEED = 0  # one seed for every interval, so runs on the same tracks share resamples
EXAMPLE_GENRE = "Hip-Hop"  # the reference study's precision-recall example
N_PR_FREQUENT = 3  # default PR genres: this many most frequent, plus EXAMPLE_GENRE
N_BAR_GENRES = 30  # genres in the per-genre AP chart, by support
PREDICTION_KEYS = ("track_ids", "y_true", "scores", "prior", "genres")
WHOLE_KEY = "scores_whole"  # in predictions.npz only when evaluated with whole_sequence=True


@dataclass
class Run:
    """One run folder with its provenance, evaluation and predictions on the test tracks."""

    name: str
    run_dir: Path
    provenance: dict  # from the model file: store, split, labels, subset, git, ...
    evaluation: dict  # RUN/metrics.json
    predictions: dict[str, np.ndarray]  # RUN/predictions.npz
    history: pd.DataFrame | None  # epoch, train_loss, val_loss (None without RUN/logs/metrics.csv)
    checked: bool  # the predictions were checked against the store's split
    tree: GenreTree | None = None  # the genre tree of the model's genres (None: neither model file nor store has it)

    @property
    def split(self) -> str:
        """The split the run was evaluated on."""
        return self.evaluation["split"]


@dataclass(frozen=True)
class ReportResult:
    """What build_report wrote."""

    out_dir: Path
    markdown: Path  # report.md
    json: Path  # report.json
    figures: list[Path]
    summary: dict  # the content of report.json


# ---------------------------------------------------------------------------- loading runs


CURVE_COLUMNS = ["epoch", "train_loss", "val_loss"]  # of train.EpochLog's RUN/logs/metrics.csv


def learning_curve(csv_path: Path) -> pd.DataFrame | None:
    """Return epoch, train_loss and val_loss from training's RUN/logs/metrics.csv (one row per epoch), or None."""
    if not csv_path.is_file():
        return None
    try:
        df = pd.read_csv(csv_path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        log.warning("%s: unreadable (%s); no learning curve for this run", csv_path, first_line(e))
        return None
    if any(c not in df.columns for c in CURVE_COLUMNS):
        log.warning("%s: not a genreclf training log (columns %s); no learning curve", csv_path, list(df.columns))
        return None
    # The log is appended to once per epoch; a run killed mid-write can leave a partial last row.
    curve = df[CURVE_COLUMNS].apply(pd.to_numeric, errors="coerce").dropna(subset=["epoch"])
    curve = curve.astype({"epoch": int}).drop_duplicates("epoch", keep="last").sort_values("epoch")
    return curve.reset_index(drop=True)


def read_predictions(path: Path) -> dict[str, np.ndarray]:
    """Return the arrays of an evaluation's predictions.npz; GenreclfError if it is truncated or corrupt."""
    try:
        with np.load(path) as npz:
            missing = [k for k in PREDICTION_KEYS if k not in npz]
            if missing:
                raise GenreclfError(f"{path}: from an older genreclf (no {', '.join(missing)}); re-evaluate the run")
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise GenreclfError(
            f"{path}: unreadable ({first_line(e)}); re-evaluate the run "
            "(`genreclf evaluate`, or give --store to the report)"
        ) from None


def _stale_reason(
    run_dir: Path,
    store: FeatureStore | None,
    split: str,
    seed: int,
    whole_sequence: bool = False,
    targets: str | None = None,
    consistent: bool | None = None,
) -> str | None:
    """Why RUN/metrics.json + predictions.npz cannot be used for `split` of `store` (None: usable).

    targets / consistent None: whatever the evaluation used; else it must have used these.
    """
    metrics, preds = run_dir / "metrics.json", run_dir / "predictions.npz"
    if not metrics.is_file() or not preds.is_file():
        return "no metrics.json and predictions.npz"
    if metrics.stat().st_mtime < (run_dir / "model.safetensors").stat().st_mtime:
        return "the model is newer than its evaluation"
    try:
        ev = json.loads(metrics.read_text())
        p = read_predictions(preds)
    except (ValueError, GenreclfError) as e:
        return first_line(e, None)
    if ev.get("split") != split or ev.get("part") != PART:
        return f"evaluated on the {ev.get('part')} part of the {ev.get('split')} split"
    if whole_sequence and WHOLE_KEY not in p:
        return "whole-sequence scores asked for but not measured"
    if consistent is not None and bool(ev.get("consistent", False)) != consistent:
        return "scored with consistent scores" if ev.get("consistent") else "scored without consistent scores"
    # An evaluation from before `targets` existed was scored against its store's own labels.
    scored = (ev.get("labels") or {}).get("targets") or (store.header.labels if store is not None else None)
    if targets is not None and scored != targets:
        return f"evaluated against {scored or 'unrecorded'} targets, not {targets}"
    track_ids, y_true = p["track_ids"], p["y_true"]
    if store is None:
        return None
    positions = split_positions(store, PART, split, seed)
    if ev.get("store") != store.describe() or not np.array_equal(track_ids, store.track_ids[positions]):
        return f"evaluated on other tracks than the {split} {PART} split of {store.path}"
    if not np.array_equal(y_true, store_targets(store, scored)[0][positions]):
        return f"evaluated with other labels than those of {store.path}"
    return None


def load_run(
    run_dir: Path,
    store: Path | None = None,
    split: str | None = None,
    progress: bool = True,
    stores: dict[Path, FeatureStore] | None = None,
    whole_sequence: bool = False,
    targets: str | None = None,
    consistent: bool | None = None,
) -> Run:
    """Return a run with its test-set evaluation, evaluating it first if needed.

    store and split default to those the run was trained on (its model file's provenance);
    `stores` caches opened stores between calls. whole_sequence=True re-evaluates a run whose
    evaluation lacks whole-sequence scores; `targets` and `consistent` (see genreclf.evaluate.evaluate),
    one that was scored otherwise (None: as it was scored; the defaults when it must be evaluated).
    """
    run_dir = Path(run_dir)
    model_path = run_dir / "model.safetensors"
    if not model_path.is_file():
        raise GenreclfError(f"{run_dir}: no model.safetensors; give run folders written by `genreclf train`")
    model_file = ModelFile.load(model_path)
    prov = model_file.provenance
    split = split or prov.get("split", "official")
    if split not in SPLITS:
        raise GenreclfError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    seed = int(prov.get("fit", {}).get("seed", 0))
    store_path = Path(store) if store else Path(prov["store"]) if prov.get("store") else None
    store_obj = None
    if store_path is not None and (store is not None or (store_path / "store.json").is_file()):
        stores = {} if stores is None else stores
        if store_path.resolve() not in stores:
            stores[store_path.resolve()] = FeatureStore.open(store_path)  # an explicit --store must open
        store_obj = stores[store_path.resolve()]
    reason = _stale_reason(run_dir, store_obj, split, seed, whole_sequence, targets, consistent)
    if reason is not None:
        if store_obj is None:
            raise GenreclfError(
                f"{run_dir}: {reason}, and its feature store {store_path} is not there; give the store with --store"
            )
        log.info("evaluating %s on the %s split (%s)", run_dir, split, reason)
        evaluate(
            model_path,
            store_path,
            split=split,
            part=PART,
            seed=seed,
            out=run_dir / "metrics.json",
            progress=progress,
            whole_sequence=whole_sequence,
            targets=targets,
            consistent=bool(consistent),
        )
    elif store_obj is None:
        log.warning("%s: store %s is not there; using its metrics.json without checking it", run_dir, store_path)
    preds = read_predictions(run_dir / "predictions.npz")
    preds["genres"] = [str(g) for g in preds["genres"]]
    if model_file.genre_parents:
        tree = GenreTree.from_ids(model_file.genre_ids, model_file.genre_parents)
    elif store_obj is not None:
        tree = GenreTree.from_ids(store_obj.genre_ids, store_obj.header.genre_parents)
    else:
        tree = None
    return Run(
        run_dir.name,
        run_dir,
        prov,
        json.loads((run_dir / "metrics.json").read_text()),
        preds,
        learning_curve(run_dir / "logs" / "metrics.csv"),
        store_obj is not None,
        tree,
    )


def _unique_names(runs: list[Run]) -> None:
    names = [r.name for r in runs]
    for i, r in enumerate(runs):
        if names.count(r.name) > 1:
            r.name = f"{r.run_dir.parent.name}/{r.run_dir.name}" if r.run_dir.parent.name else f"{r.name}#{i + 1}"
    names = [r.name for r in runs]
    for i, r in enumerate(runs):
        if names.count(r.name) > 1:
            r.name = f"{r.name}#{i + 1}"


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Return the runs by evaluated split; raise GenreclfError if a group's runs saw different tracks."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.split, []).append(r)
    for r in runs[1:]:
        if r.predictions["genres"] != runs[0].predictions["genres"]:
            raise GenreclfError(
                f"runs {runs[0].name} and {r.name} use different genre vocabularies; "
                "report on models trained on the same store"
            )
    for split, members in groups.items():
        q = members[0].predictions
        for r in members[1:]:
            p = r.predictions
            if not (np.array_equal(p["track_ids"], q["track_ids"]) and np.array_equal(p["y_true"], q["y_true"])):
                raise GenreclfError(
                    f"runs {members[0].name} and {r.name} were evaluated on different tracks or labels of the "
                    f"{split} split (another store or split seed); give --store (and --split) so that all runs "
                    "are evaluated on the same tracks, or report on them separately"
                )
    return groups


# ---------------------------------------------------------------------------- numbers


def _ci(y: np.ndarray, s: np.ndarray, metric: str, n_boot: int) -> dict:
    point, low, high = bootstrap_ci(y, s, metric, n_boot=n_boot, seed=BOOT_SEED, alpha=ALPHA)
    return {"value": point, "low": low, "high": high}


def run_summary(run: Run, n_boot: int) -> dict:
    """Return a run's summary metrics with intervals and chance levels, top-level accuracy, crop effect."""
    log.info("bootstrap intervals for %s", run.name)
    p, ev = run.predictions, run.evaluation
    crops = tagging_metrics(p["y_true"], p["scores"], p["genres"], p["prior"])
    metrics = {
        m: {
            **_ci(p["y_true"], p["scores"], m, n_boot),
            "chance": crops[f"chance_{m}"],
            "random": crops.get(f"random_{m}"),
        }
        for m in SUMMARY
    }
    prov = run.provenance
    return {
        "name": run.name,
        "run_dir": str(run.run_dir),
        "model_kind": ev.get("model_kind"),
        "parameters": prov.get("parameters"),
        "epochs": prov.get("epochs"),
        "best_val_loss": prov.get("best_val_loss"),
        "trained_split": prov.get("split"),
        "evaluated_split": run.split,
        "part": PART,
        "n_tracks": len(p["track_ids"]),
        "n_failed_in_store": ev.get("n_failed_in_store"),
        "store": prov.get("store"),
        "store_description": ev.get("store"),
        "labels": prov.get("labels"),
        "subset": prov.get("subset"),
        "git": prov.get("git"),
        "trained": prov.get("date"),
        "train_tracks": prov.get("train_tracks"),
        "checked_against_store": run.checked,
        "scoring": _scoring(run),
        "metrics": metrics,
        "levels": None if run.tree is None else level_metrics(p["y_true"], p["scores"], p["prior"], run.tree),
        "top_level": ev.get("top_level_accuracy"),
        "macro_genres": {
            "ap_macro": crops["n_genres_ap"],
            "roc_auc_macro": crops["n_genres_roc_auc"],
            "of": crops["n_genres"],
            "rule": MACRO_GENRE_SET,
        },
        "crop_averaging": _crop_averaging(run, crops, n_boot),
    }


def _scoring(run: Run) -> dict:
    """Return what the run was trained on, what it was scored against, and whether its scores were made consistent."""
    ev = run.evaluation
    labels = ev.get("labels") or {}  # absent from evaluations made before targets existed: the store's own
    return {
        "trained": labels.get("trained", run.provenance.get("labels")),
        "targets": labels.get("targets"),
        "store": labels.get("store"),
        "targets_from": labels.get("targets_from", "the store's own labels"),
        "consistent": bool(ev.get("consistent", False)),
        "consistency_rule": ev.get("consistency_rule"),
    }


def _crop_averaging(run: Run, crops: dict, n_boot: int) -> dict:
    """Return crop-mean vs whole-sequence metrics and their paired ap_weighted difference (None if unmeasured)."""
    p = run.predictions
    out = {
        "crops": run.evaluation.get("crops"),
        "crops_mean": {m: crops[m] for m in SUMMARY},
        "whole": None,
        "ap_weighted_diff": None,
    }
    if WHOLE_KEY in p:
        whole = tagging_metrics(p["y_true"], p[WHOLE_KEY], p["genres"], p["prior"])
        out["whole"] = {m: whole[m] for m in SUMMARY}
        out["ap_weighted_diff"] = paired_bootstrap_diff(
            p["y_true"], p["scores"], p[WHOLE_KEY], "ap_weighted", n_boot=n_boot, seed=BOOT_SEED, alpha=ALPHA
        )
    return out


def compare(group: list[Run], n_boot: int) -> list[dict]:
    """Return paired bootstrap differences (run - the group's first run, the baseline) of every summary metric."""
    base = group[0].predictions
    out = []
    for r in group[1:]:
        for m in SUMMARY:
            d = paired_bootstrap_diff(
                base["y_true"], r.predictions["scores"], base["scores"], m, n_boot=n_boot, seed=BOOT_SEED, alpha=ALPHA
            )
            out.append(
                {
                    "metric": m,
                    "run": r.name,
                    "baseline": group[0].name,
                    "value_run": d["a"],
                    "value_baseline": d["b"],
                    "diff": d["diff"],
                    "low": d["low"],
                    "high": d["high"],
                    "frac_run_better": d["frac_a_better"],
                    "n_boot": d["n_boot"],
                    "excludes_zero": bool(d["low"] > 0 or d["high"] < 0),
                }
            )
    return out


def per_genre_table(group: list[Run]) -> list[dict]:
    """Return support, prevalence, AP and ROC-AUC per run for the genres present, by support (stable)."""
    p0 = group[0].predictions
    per = [per_genre_metrics(p0["y_true"], r.predictions["scores"]) for r in group]
    support = per[0]["support"]
    order = [int(g) for g in np.argsort(-support, kind="stable") if support[g] > 0]
    return [
        {
            "genre": p0["genres"][g],
            "support": int(support[g]),
            "prevalence": float(per[0]["prevalence"][g]),
            "ap": {r.name: float(m["ap"][g]) for r, m in zip(group, per)},
            "roc_auc": {r.name: float(m["roc_auc"][g]) for r, m in zip(group, per)},
        }
        for g in order
    ]


def choose_pr_genres(rows: list[dict], wanted: list[str] | None, genres: list[str]) -> list[str]:
    """Return the genres for PR curves: `wanted` (present ones), else the most frequent few and Hip-Hop."""
    present = [row["genre"] for row in rows]
    if wanted:
        unknown = [g for g in wanted if g not in genres]
        if unknown:
            raise GenreclfError(
                f"unknown genre(s) {', '.join(unknown)}; use names from the store's genres, "
                f"e.g. {', '.join(present[:5])}"
            )
        return [g for g in wanted if g in present]
    chosen = present[:N_PR_FREQUENT]
    return chosen + [EXAMPLE_GENRE] if EXAMPLE_GENRE in present and EXAMPLE_GENRE not in chosen else chosen


# ---------------------------------------------------------------------------- the report


def _group_section(
    group: list[Run], out_dir: Path, n_boot: int, pr_genres: list[str] | None
) -> tuple[dict, list[Path]]:
    """Return one split group's comparisons and per-genre table, and its figures."""
    split = group[0].split
    rows = per_genre_table(group)
    chosen = choose_pr_genres(rows, pr_genres, group[0].predictions["genres"])
    figures = [per_genre_figure(rows[:N_BAR_GENRES], [r.name for r in group], out_dir / f"per_genre_ap_{split}.png")]
    if chosen:
        figures.append(pr_figure(group, chosen, out_dir / f"pr_curves_{split}.png"))
    section = {
        "split": split,
        "runs": [r.name for r in group],
        "n_tracks": len(group[0].predictions["y_true"]),
        "comparisons": compare(group, n_boot),
        "per_genre": rows,
        "pr_genres": chosen,
    }
    return section, figures


def build_report(
    run_dirs: list[Path],
    out_dir: Path,
    store: Path | None = None,
    split: str | None = None,
    n_boot: int = 1000,
    pr_genres: list[str] | None = None,
    progress: bool = True,
    whole_sequence: bool = False,
    targets: str | None = None,
    consistent: bool | None = None,
) -> ReportResult:
    """Write report.md, report.json and PNG figures comparing the runs to `out_dir`; return what was written.

    whole_sequence=True compares crop averaging with whole-sequence scores, evaluating runs that lack them.
    targets ("genres" or "genres_all") and consistent: score every run so, re-evaluating those scored
    otherwise (None: each run as it was evaluated; see load_run).
    """
    if not run_dirs:
        raise GenreclfError("give at least one run folder written by `genreclf train`")
    if n_boot < 1:
        raise GenreclfError(f"the number of bootstrap resamples must be at least 1, got {n_boot}")
    stores: dict[Path, FeatureStore] = {}
    runs = [load_run(Path(d), store, split, progress, stores, whole_sequence, targets, consistent) for d in run_dirs]
    _unique_names(runs)
    groups = group_runs(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("bootstrapping %d resamples for %d runs", n_boot, len(runs))
    summaries = [run_summary(r, n_boot) for r in runs]
    figures = [metrics_figure(summaries, out_dir / "metrics.png")]
    group_out = []
    for group in groups.values():
        section, group_figures = _group_section(group, out_dir, n_boot, pr_genres)
        group_out.append(section)
        figures += group_figures
    curves = {r.name: r.history for r in runs if r.history is not None and len(r.history)}
    if curves:
        figures.append(learning_curves_figure(curves, out_dir / "learning_curves.png"))
    summary = _clean(
        {
            "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
            "genreclf": __version__,
            "git": git_revision(),
            "n_boot": n_boot,
            "alpha": ALPHA,
            "part": PART,
            "runs": summaries,
            "groups": group_out,
            "figures": [f.name for f in figures],
        }
    )
    md = out_dir / "report.md"
    js = out_dir / "report.json"
    atomic_write_text(js, json.dumps(summary, indent=1, allow_nan=False))
    atomic_write_text(md, render(summary))
    return ReportResult(out_dir, md, js, figures, summary)


def _clean(x: object) -> object:
    """Return x with numpy scalars as Python numbers and nan as None (strict JSON)."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x
