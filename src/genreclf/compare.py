"""`genreclf compare`: several training seeds of each model, and which model is better once seeds count.

    OUT/runs/MODEL-seedK/   ordinary run folders of `genreclf train` (seeds 0 .. seeds - 1), each evaluated on
                            the official split's test tracks (metrics.json, predictions.npz): `genreclf report`
                            and `genreclf evaluate` take them as they are
    OUT/compare.json        per metric: each model's mean and sd over seeds with an interval over seeds and
                            test tracks, each seed's value with its track-only interval; each pair's difference
                            with its interval, the intervals that ignore seeds for contrast, and a verdict
    OUT/compare.md          the same in words, with the figure
    OUT/compare.png         each seed's value and each model's interval, per metric

Run again, a compare continues where it stopped: a finished run (its model file; its evaluation is
made if missing) is not retrained, an unfinished one resumes from its last checkpoint, and the report
is written anew. Every run must have been started with the same settings and store.

Runs are trained and tested on FMA's artist-filtered ("official") split, whose test tracks are the
same for every seed; the reference's random split draws other test tracks with each seed, so runs of
different seeds could not be paired on tracks. The numbers are genreclf.compare_stats'.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from genreclf import __version__
from genreclf.atomic import atomic_write_text
from genreclf.compare_report import figure, render
from genreclf.compare_stats import MIN_SEEDS, summarise
from genreclf.config import FitConfig, TrainConfig
from genreclf.errors import GenreclfError
from genreclf.metrics import SUMMARY
from genreclf.modelfile import ModelFile
from genreclf.provenance import git_revision
from genreclf.report import ALPHA, BOOT_SEED, Run, _clean, group_runs, load_run
from genreclf.store import FeatureStore
from genreclf.train import MODELS, check_started_with, train

log = logging.getLogger(__name__)

SPLIT = "official"  # the same test tracks for every seed
FINISHED_SAME = ("epochs", "early_stopping")  # may differ on --resume, but not between runs compared


@dataclass(frozen=True)
class CompareResult:
    """What compare_models wrote."""

    out_dir: Path
    markdown: Path  # compare.md
    json: Path  # compare.json
    figure: Path  # compare.png
    summary: dict  # the content of compare.json
    trained: list[str]  # the runs this call trained or resumed (none when every run was finished)


def run_name(model: str, seed: int) -> str:
    """Return the run folder's name of one (model, seed); `model` may be a variant's name, as "gru-focal"."""
    return f"{model}-seed{seed}"


def variants(models: Sequence[str], optims: Sequence[TrainConfig]) -> list[tuple[str, str, TrainConfig]]:
    """Return (name, model, settings) of everything compared: each model, or each (model, loss) for several losses.

    One TrainConfig: the models are named as they are ("gru"); several (one per loss): "gru-focal" and so on.
    """
    losses = [o.loss for o in optims]
    if not optims:
        raise GenreclfError("give the training settings of at least one loss")
    if len(set(losses)) < len(losses):
        raise GenreclfError(f"a loss is given twice ({', '.join(losses)}); give each loss once")
    if len(optims) == 1:
        return [(model, model, optims[0]) for model in models]
    return [(f"{model}-{o.loss}", model, o) for model in models for o in optims]


def _check_arguments(models: Sequence[str], seeds: int, fit: FitConfig, n_boot: int) -> None:
    """Raise GenreclfError for models, seeds, split or resamples that compare cannot use."""
    if not models:
        raise GenreclfError(f"give at least one model ({', '.join(MODELS)})")
    for model in models:
        if model not in MODELS:
            raise GenreclfError(f"unknown model {model!r}; use one of {', '.join(MODELS)}")
        if list(models).count(model) > 1:
            raise GenreclfError(f"model {model!r} is given twice; give each model once")
    if seeds < MIN_SEEDS:
        raise GenreclfError(
            f"{seeds} seed(s) per model: a standard deviation across seeds needs at least {MIN_SEEDS}; "
            "for one run of each model use `genreclf train` and `genreclf report`"
        )
    if n_boot < 2:
        raise GenreclfError(f"the number of bootstrap resamples must be at least 2 (for a variance), got {n_boot}")
    if fit.split != SPLIT:
        raise GenreclfError(
            f"compare trains on the {SPLIT} split only: the {fit.split} split draws other test tracks with "
            "each seed, so the seeds' runs could not be scored on the same tracks"
        )


def _check_finished(run_dir: Path, store: Path, fit: FitConfig, optim: TrainConfig) -> None:
    """Raise GenreclfError unless the finished run in run_dir was trained as asked, on this store."""
    check_started_with(run_dir, store, fit, optim)
    trained = ModelFile.load(run_dir / "model.safetensors").provenance.get("fit", {})
    for key in FINISHED_SAME:
        if trained.get(key) != getattr(fit, key):
            raise GenreclfError(
                f"{run_dir} was trained with {key}={trained.get(key)!r}, not {getattr(fit, key)!r}; "
                "give the options it was trained with, or a new --out"
            )


def compare_models(
    store: str | Path,
    out: str | Path,
    models: Sequence[str] = ("gru", "transformer"),
    seeds: int = 5,
    fit: FitConfig = FitConfig(),
    optim: TrainConfig | Sequence[TrainConfig] = TrainConfig(),
    n_boot: int = 1000,
    progress: bool = True,
) -> CompareResult:
    """Train (or resume) seeds 0 .. seeds - 1 of each model, evaluate all on the same test tracks; write the report.

    `fit` and `optim` are every run's settings; fit.model and fit.seed are set per run. Several `optim`
    (one per loss) compare every (model, loss), named "gru-focal" and so on (see `variants`).
    """
    models = list(models)
    _check_arguments(models, seeds, fit, n_boot)
    compared = variants(models, [optim] if isinstance(optim, TrainConfig) else list(optim))
    store, out = Path(store), Path(out)
    FeatureStore.open(store)  # a missing or unfinished store fails before any training
    plan = [(variant, seed) for variant in compared for seed in range(seeds)]
    runs: dict[str, Run] = {}
    trained, seconds, stores = [], {}, {}
    t0 = time.perf_counter()
    for i, ((label, model, settings), seed) in enumerate(plan, 1):
        name = run_name(label, seed)
        run_dir = out / "runs" / name
        run_fit = dataclasses.replace(fit, model=model, seed=seed)
        if (run_dir / "model.safetensors").is_file():
            _check_finished(run_dir, store, run_fit, settings)
            log.info("compare: %d of %d: %s is trained already", i, len(plan), name)
        else:
            resume = (run_dir / "checkpoints" / "last.ckpt").is_file()
            log.info("compare: %d of %d: %s %s", i, len(plan), "resuming" if resume else "training", name)
            seconds[name] = train(store, run_dir, run_fit, settings, resume=resume, progress=progress).seconds
            trained.append(name)
        runs[name] = load_run(run_dir, store, SPLIT, progress, stores)  # evaluates it unless done
    group_runs(list(runs.values()))  # the same tracks and labels, as one store and split promise
    log.info("compare: %d track resamples of %d runs for %d metrics", n_boot, len(runs), len(SUMMARY))
    summary = _summary(store, out, compared, seeds, fit, n_boot, runs)
    summary["seconds"] = {"trained_this_call": seconds, "this_call": time.perf_counter() - t0}
    summary = _clean(summary)
    out.mkdir(parents=True, exist_ok=True)
    png = figure(summary, out / "compare.png")
    md, js = out / "compare.md", out / "compare.json"
    atomic_write_text(js, json.dumps(summary, indent=1, allow_nan=False))
    atomic_write_text(md, render(summary))
    return CompareResult(out, md, js, png, summary, trained)


def _summary(
    store: Path,
    out: Path,
    compared: list[tuple[str, str, TrainConfig]],
    seeds: int,
    fit: FitConfig,
    n_boot: int,
    runs: dict[str, Run],
) -> dict:
    """Return compare.json's content: settings, runs, and per metric the models' and pairs' numbers."""
    first = next(iter(runs.values()))
    y_true = first.predictions["y_true"]
    models = [label for label, _, _ in compared]
    scores = {m: [runs[run_name(m, k)].predictions["scores"] for k in range(seeds)] for m in models}
    metrics = {}
    for metric in SUMMARY:
        metrics[metric] = summarise(y_true, scores, metric, n_boot, BOOT_SEED, ALPHA)
        metrics[metric]["chance"] = first.evaluation["metrics"][f"chance_{metric}"]
    settings = {k: v for k, v in dataclasses.asdict(fit).items() if k not in ("model", "seed")}
    return {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "genreclf": __version__,
        "git": git_revision(),
        "store": str(store.resolve()),
        "store_description": first.evaluation.get("store"),
        "split": SPLIT,
        "part": "test",
        "n_tracks": int(len(y_true)),
        "models": models,
        "seeds": list(range(seeds)),
        "n_boot": n_boot,
        "alpha": ALPHA,
        "fit": settings,
        # The settings of every run; with several losses, those they share, each loss's own in "losses".
        "train_config": _shared_settings([o for _, _, o in compared]),
        "losses": {o.loss: o.loss_record() for _, _, o in compared},
        "runs": [_run_record(name, run, out) for name, run in runs.items()],
        "metrics": metrics,
    }


def _shared_settings(optims: list[TrainConfig]) -> dict:
    """The TrainConfig fields with one value in all of `optims` (all of them when there is one)."""
    records = [dataclasses.asdict(o) for o in optims]
    return {k: v for k, v in records[0].items() if all(r[k] == v for r in records)}


def _run_record(name: str, run: Run, out: Path) -> dict:
    prov, top = run.provenance, run.evaluation.get("top_level_accuracy") or {}
    return {
        "name": name,
        "model": prov.get("fit", {}).get("model"),
        "loss": (prov.get("train_config") or {}).get("loss"),
        "seed": prov.get("fit", {}).get("seed"),
        "run_dir": str(run.run_dir.relative_to(out)),
        "epochs": prov.get("epochs"),
        "best_val_loss": prov.get("best_val_loss"),
        "train_seconds": prov.get("train_seconds"),
        "top_level_accuracy": top.get("accuracy"),
    }
