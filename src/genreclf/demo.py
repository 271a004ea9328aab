"""`genreclf demo`: the whole pipeline on a generated corpus, in a few minutes on a laptop CPU.

Every number it prints is computed by the run itself on the synthetic corpus it generates.
The demo trains with a learning rate of 1e-3 rather than the reference's 1e-5 and batches of
16 rather than 32, so that a few epochs are enough; everything else is the reference recipe.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from genreclf import audio, timeline
from genreclf.atomic import atomic_write_text
from genreclf.config import FitConfig, TrainConfig
from genreclf.evaluate import evaluate, fmt
from genreclf.featurize import featurize
from genreclf.metadata import audio_path
from genreclf.metrics import SUMMARY
from genreclf.predict import Tagger
from genreclf.report import build_report
from genreclf.store import FeatureStore
from genreclf.synth import make_corpus
from genreclf.train import train

log = logging.getLogger(__name__)

DEMO_LR = 1e-3  # 100x the reference's 1e-5: the demo has minutes, not days
DEMO_BATCH = 16  # half the reference's 32: twice the optimiser steps in the same time
# Both models on FMA's artist-filtered split, and the GRU again on the reference's leaky random split.
RUNS = (("gru", "official"), ("transformer", "official"), ("gru", "reference"))


def run_demo(
    out: str | Path, tracks: int = 300, seconds: float = 10.0, epochs: int = 14, seed: int = 0, progress: bool = True
) -> dict:
    """Run synth -> featurize -> train both models -> evaluate -> predict; return the summary."""
    out = Path(out)
    t0 = time.perf_counter()
    corpus, store_dir = out / "corpus", out / "store"
    timings = {}
    if not (corpus / "fma_metadata" / "tracks.csv").exists():
        t = time.perf_counter()
        # 22.05 kHz mono MP3s encode 3x faster than FMA's 44.1 kHz stereo; features are 16 kHz mono anyway.
        make_corpus(corpus, tracks, seconds=seconds, seed=seed, sample_rate=22050, channels=1)
        timings["synth"] = time.perf_counter() - t
    t = time.perf_counter()
    featurize(corpus, store_dir, progress=progress)
    timings["featurize"] = time.perf_counter() - t
    store = FeatureStore.open(store_dir)
    log.info("store: %s", store.describe())

    rows, results, run_dirs = [], [], []
    for model, split in RUNS:
        run_dir = out / "runs" / (model if split == "official" else f"{model}_{split}_split")
        run_dirs.append(run_dir)
        resume = (run_dir / "checkpoints" / "last.ckpt").exists() and not (run_dir / "model.safetensors").exists()
        if not (run_dir / "model.safetensors").exists():
            log.info("demo: training %s on the %s split", model, split)
            fit = FitConfig(model=model, epochs=epochs, batch_size=DEMO_BATCH, seed=seed, workers=0, split=split)
            run = train(store_dir, run_dir, fit, TrainConfig(lr=DEMO_LR), resume=resume, progress=progress)
            timings[f"train_{model}_{split}"] = run.seconds
        info = json.loads((run_dir / "train.json").read_text())
        result = evaluate(run_dir, store_dir, split=split, out=run_dir / "metrics.json", progress=False)
        if split == "official":
            results.append(result)
            rows.append((model, info))
        else:
            leaky = result

    table = _side_by_side(rows, results)
    print()
    print(f"GRU vs Transformer on the synthetic corpus ({store.describe()})")
    print(table)
    print(
        f"GRU trained and tested on the reference study's random 80/20 split instead, where an artist's songs "
        f"land on both sides: ap_weighted {fmt(leaky['metrics']['ap_weighted'])} on its "
        f"{leaky['n_tracks']} test tracks (official, artist-filtered: {fmt(results[0]['metrics']['ap_weighted'])})"
    )
    print()
    examples = _examples(out, corpus, store, results)
    mix = _timeline(out, corpus, store)
    t = time.perf_counter()
    report = build_report(run_dirs, out / "report", n_boot=1000, progress=False)
    timings["report"] = time.perf_counter() - t
    summary = {
        "timings_s": timings,
        "total_s": time.perf_counter() - t0,
        "results": results,
        "reference_split_gru": leaky,
        "examples": examples,
        "timeline": mix,
        "report": str(report.markdown),
    }
    atomic_write_text(out / "demo.json", json.dumps(summary, indent=1))
    print(f"report with confidence intervals and figures: {report.markdown}")
    print(
        f"everything is in {out}/: corpus/ (MP3 + FMA metadata), store/ (features), runs/ (gru, transformer, "
        f"gru_reference_split: model.safetensors, metrics.json, logs/metrics.csv), report/, demo.json "
        f"({summary['total_s']:.0f} s in all)"
    )
    return summary


def _side_by_side(rows: list[tuple[str, dict]], results: list[dict]) -> str:
    lines = [f"{'':<28}{'GRU':>12}{'Transformer':>14}{'chance':>10}"]
    lines.append(f"{'parameters':<28}" + "".join(f"{i['parameters']:>{w},}" for (_, i), w in zip(rows, (12, 14))))
    lines.append(
        f"{'training time (s)':<28}" + "".join(f"{i['train_seconds']:>{w}.0f}" for (_, i), w in zip(rows, (12, 14)))
    )
    lines.append(
        f"{'epochs (best val_loss)':<28}"
        + "".join(
            f"{str(i['epochs']) + ' (' + format(i['best_val_loss'], '.3f') + ')':>{w}}"
            for (_, i), w in zip(rows, (12, 14))
        )
    )
    for key in SUMMARY:
        chance = results[0]["metrics"]["chance_" + key]
        lines.append(
            f"{key:<28}" + "".join(fmt(r["metrics"][key], w) for r, w in zip(results, (12, 14))) + fmt(chance, 10)
        )
    accs = [r["top_level_accuracy"] for r in results]
    if all(a["accuracy"] is not None for a in accs):
        lines.append(
            f"{'top-level genre accuracy':<28}"
            + "".join(fmt(a["accuracy"], w) for a, w in zip(accs, (12, 14)))
            + fmt(accs[0]["majority_class"], 10)
        )
    r0 = results[0]
    lines.append(
        f"test split: {r0['n_tracks']} tracks of artists unseen in training; metrics averaged over "
        f"{r0['crops']['count']} crops of {r0['crops']['length']} frames; chance = prior-only predictor "
        "(majority class for accuracy)"
    )
    return "\n".join(lines)


def _examples(out: Path, corpus: Path, store: FeatureStore, results: list[dict], n: int = 3) -> list[dict]:
    test = np.flatnonzero(store.split == "test")[:n]
    taggers = {m: Tagger.load(out / "runs" / m) for m in ("gru", "transformer")}
    examples = []
    for pos in test:
        track_id = int(store.track_ids[pos])
        path = audio_path(corpus / "fma_large", track_id)
        truth = [store.genres[g] for g in np.flatnonzero(store.targets[pos])]
        print(f"{path.relative_to(out)}  (true genres: {', '.join(truth)})")
        record = {"file": str(path), "true": truth}
        for model, tagger in taggers.items():
            top = tagger.predict(path).top(5)
            record[model] = top
            print(f"  {model:<12} " + ", ".join(f"{g} {p:.2f}" for g, p in top))
        examples.append(record)
    print()
    return examples


def _timeline(out: Path, corpus: Path, store: FeatureStore, groups: int = 3, clips: int = 2, step: float = 5.0) -> dict:
    """Tag a mix of test clips with different genres with the GRU, every `step` s; draw it to out/timeline.png."""
    by_genres: dict[tuple[int, ...], list[int]] = {}  # test clips by their exact set of genres
    for pos in np.flatnonzero(store.split == "test"):
        own = tuple(int(g) for g in np.flatnonzero(store.targets[pos]))
        by_genres.setdefault(own, []).append(int(store.track_ids[pos]))
    chosen = sorted((g for g in by_genres if len(by_genres[g]) >= clips), key=lambda g: -len(by_genres[g]))[:groups]
    if len(chosen) < 2:
        log.info("demo: too few test clips of shared genres for a timeline")
        return {}
    parts, changes, at = [], [], 0.0
    for genre_set in chosen:
        changes.append((at, "+".join(store.genres[g] for g in genre_set)))
        for track_id in by_genres[genre_set][:clips]:
            parts.append(audio.load(audio_path(corpus / "fma_large", track_id)))
            at += len(parts[-1]) / audio.SAMPLE_RATE
    mix = np.concatenate(parts)
    result = Tagger.load(out / "runs" / "gru").predict(mix, timeline=step)
    clips_said = ", ".join(f"{g} from {timeline.hms(t)}" for t, g in changes)
    path = out / "timeline.png"
    timeline.plot(result.timeline, result.genres, result.probabilities, path, f"demo GRU, {clips_said}")
    print(f"timeline of a {len(mix) / audio.SAMPLE_RATE:.0f}-s mix of test clips ({clips_said}): {path}")
    print()
    return {"clips": [[t, g] for t, g in changes], "step": step, "png": str(path)}
