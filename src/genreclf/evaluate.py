"""Evaluate a trained model on a split of a feature store.

Predictions are the mean over evenly spaced crops of each track (deterministic), and,
when asked (whole_sequence=True), over the whole sequence at once; metrics come with the chance level of a
prior-only predictor (see genreclf.metrics), on all genres and on each level of FMA's genre tree
(`level_metrics`). Targets are the store's own label set, or the other one derived through the tree
(genreclf.hierarchy.convert_targets); consistent=True scores with genreclf.hierarchy.make_consistent.
The model is never chosen on the test split: training picks its checkpoint by validation loss.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from genreclf.atomic import atomic_savez, atomic_write_text
from genreclf.crops import CROP_FRAMES, N_CROPS
from genreclf.data import split_positions
from genreclf.errors import GenreclfError
from genreclf.hierarchy import CONSISTENCY_RULE, GenreTree, convert_targets, level_name, make_consistent
from genreclf.metrics import SUMMARY, tagging_metrics, top_level_accuracy
from genreclf.modelfile import ModelFile
from genreclf.models import ModelConfig
from genreclf.predict import score_features
from genreclf.progress import progress_bar
from genreclf.store import FeatureStore

log = logging.getLogger(__name__)

BATCH_SIZE = 64  # tracks per batch when scoring crops
WHOLE_SEQUENCE_BUDGET = 256 * 2**20  # bytes one whole-sequence batch may hold in activations and attention
ATTENTION_COPIES = 3  # (frames x frames) score matrices alive at once on SDPA's math path (2.3 measured on CPU)
ACTIVATION_FLOATS = 12  # floats per frame per unit of model width alive at once (measured ~5 for both models)


def whole_sequence_bytes(cfg: ModelConfig, frames: int) -> int:
    """Return an upper bound of the bytes one track of `frames` frames needs in a whole-sequence forward pass."""
    # Layers run one after the other, so only one layer's activations and attention scores are alive.
    width = max(cfg.n_mels, getattr(cfg, "d_ff", 0), 2 * getattr(cfg, "hidden", 0))
    activations = ACTIVATION_FLOATS * width * frames * 4
    # The fused kernels never hold the (frames x frames) scores, but the math path (any device,
    # any mask) does: count it, so that the bound holds whichever kernel PyTorch picks.
    attention = ATTENTION_COPIES * getattr(cfg, "n_heads", 0) * frames**2 * 4
    return activations + attention


def whole_sequence_batch(
    cfg: ModelConfig, frames: int, budget: int = WHOLE_SEQUENCE_BUDGET, cap: int = BATCH_SIZE
) -> int:
    """Return how many whole sequences of `frames` frames to score at once within `budget` bytes (1 to cap)."""
    return int(max(1, min(cap, budget // whole_sequence_bytes(cfg, frames))))


def predict_store(
    model: torch.nn.Module,
    store: FeatureStore,
    positions: np.ndarray,
    crop: int | None = CROP_FRAMES,
    n_crops: int = N_CROPS,
    batch_size: int = BATCH_SIZE,
    progress: bool = False,
) -> np.ndarray:
    """Return probabilities (len(positions), genres) for the tracks at `positions` of `store`."""
    device = next(model.parameters()).device
    out = np.zeros((len(positions), len(store.genres)), np.float32)
    model.eval()
    bar = progress_bar(len(positions), desc="evaluate", unit="track", enabled=progress)
    for b in range(0, len(positions), batch_size):
        batch = positions[b : b + batch_size]
        x = torch.from_numpy(np.stack([store.item(int(p)) for p in batch]).astype(np.float32)).to(device)
        valid = torch.from_numpy(store.valid_frames[batch]).to(device)
        out[b : b + len(batch)] = score_features(model, x, valid, crop, n_crops).cpu().numpy()
        bar.update(len(batch))
    bar.close()
    return out


def check_vocabulary(model_file: ModelFile, store: FeatureStore, model_path: Path) -> None:
    """Raise GenreclfError unless the model and the store use the same genres and audio settings."""
    store.signal.check_same(model_file.signal, f"model {model_path}")
    if list(model_file.genre_ids) != [int(g) for g in store.genre_ids]:
        raise GenreclfError(f"model {model_path} was trained on another genre vocabulary than store {store.path}")


def store_tree(store: FeatureStore) -> GenreTree:
    """Return the genre tree of a store's genres (store.json keeps genres.csv's parents)."""
    return GenreTree.from_ids(store.genre_ids, store.header.genre_parents)


def store_targets(store: FeatureStore, labels: str | None = None) -> tuple[np.ndarray, str, str]:
    """Return (targets (tracks, genres) uint8, their label set, how they were made) of `store` as `labels`.

    labels None: the store's own label set ("genres" or "genres_all"). The other one is derived through
    the genre tree: exactly for genres_all, approximately for genres (genreclf.hierarchy.DERIVED_TARGETS).
    """
    want = labels or store.header.labels
    targets, how = convert_targets(store.targets, store.header.labels, want, store_tree(store))
    return targets, want, how


def level_metrics(y_true: np.ndarray, scores: np.ndarray, prior: np.ndarray, tree: GenreTree) -> list[dict]:
    """Return the summary metrics with their chance levels on all genres, then on each level of the tree.

    Level 1 holds the top-level genres (FMA's 16 roots), level 2 their children, and so on; each level's
    metrics are those of its genres' columns alone (genreclf.metrics.tagging_metrics on them).
    """
    groups = [(None, np.arange(len(tree)))] + list(tree.levels().items())
    out = []
    for depth, columns in groups:
        m = tagging_metrics(y_true[:, columns], scores[:, columns], prior=np.asarray(prior)[columns])
        keys = [k for name in SUMMARY for k in (name, f"chance_{name}", f"random_{name}") if k in m]
        counts = ("n_genres", "n_genres_ap", "n_genres_roc_auc", "n_positive_pairs")
        record = {"depth": depth, **{k: m[k] for k in counts}, **{k: m[k] for k in keys}}
        if not record["n_genres_roc_auc"]:  # no genre to average: no chance level either
            record["chance_roc_auc_macro"] = None
        out.append(record)
    return out


@dataclass(frozen=True)
class Scoring:
    """A model file and a store opened together, and the split and seed to score it on."""

    model_path: Path  # the model.safetensors file
    model_file: ModelFile
    store: FeatureStore
    split: str  # as asked, else the one the model was trained on
    seed: int  # as asked, else the model's training seed
    trained_split: str
    trained_seed: int


def open_scoring(
    model_path: str | Path, store_path: str | Path, split: str | None = None, seed: int | None = None
) -> Scoring:
    """Return the model (a file or its run folder) and the store, checked to share genres and audio settings."""
    model_path = Path(model_path)
    if model_path.is_dir():
        model_path = model_path / "model.safetensors"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_file = ModelFile.load(model_path, device)
    store = FeatureStore.open(store_path)
    check_vocabulary(model_file, store, model_path)
    trained_split = model_file.provenance.get("split", "official")
    trained_seed = int(model_file.provenance.get("fit", {}).get("seed", 0))
    return Scoring(
        model_path,
        model_file,
        store,
        split or trained_split,
        trained_seed if seed is None else seed,
        trained_split,
        trained_seed,
    )


def evaluate(
    model_path: str | Path,
    store_path: str | Path,
    split: str | None = None,
    part: str = "test",
    crop: int = CROP_FRAMES,
    n_crops: int = N_CROPS,
    seed: int | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    whole_sequence: bool = False,
    targets: str | None = None,
    consistent: bool = False,
) -> dict:
    """Return (and write to `out`, with predictions.npz beside it) the metrics of a model on a split.

    whole_sequence=True also scores each track's whole sequence at once ("metrics_whole_sequence"),
    in batches sized so that their attention stays within WHOLE_SEQUENCE_BUDGET. It is off by default:
    the models were trained on crops of at most 256 frames, not on whole 938-frame tracks.

    targets: "genres" or "genres_all", the label set to score against (None: the store's own; see
    store_targets), whatever the model was trained on ("labels" in the result says both).
    consistent=True makes the scores hierarchy-consistent first (genreclf.hierarchy.CONSISTENCY_RULE).

    `split` and `seed` default to those the model was trained with (its provenance). Tracks
    of the evaluated part that were in the model's own training split are counted in
    `n_seen_in_training` and warned about: their scores measure memory, not tagging.
    """
    o = open_scoring(model_path, store_path, split, seed)
    model_path, model_file, store, split, seed = o.model_path, o.model_file, o.store, o.split, o.seed
    trained_split, trained_seed = o.trained_split, o.trained_seed
    positions = split_positions(store, part, split, seed)
    train_positions = split_positions(store, "training", split, seed)
    same = split == trained_split and (split == "official" or seed == trained_seed)
    seen = np.intersect1d(
        positions, train_positions if same else _positions_or_none(store, trained_split, trained_seed)
    )
    if len(seen):
        log.warning(
            "%d of the %d %s tracks were in the training split of %s (%s split, seed %d): their scores "
            "flatter the model; evaluate with the split it was trained on",
            len(seen),
            len(positions),
            part,
            model_path,
            trained_split,
            trained_seed,
        )
    tree = store_tree(store)
    all_targets, target_labels, targets_from = store_targets(store, targets)
    trained_labels = model_file.provenance.get("labels")
    if targets is None and trained_labels not in (None, target_labels):
        log.warning(
            "%s was trained on %s labels but store %s holds %s: evaluating against %s (--targets %s: against %s)",
            model_path,
            trained_labels,
            store.path,
            target_labels,
            target_labels,
            trained_labels,
            trained_labels,
        )
    y_true = all_targets[positions].astype(np.int8)
    prior = all_targets[train_positions].mean(0)  # the prior-only predictor knows the training prevalence
    scores = predict_store(model_file.model, store, positions, crop, n_crops, progress=progress)
    if consistent:
        scores = make_consistent(scores, tree)
    result = {
        "model": str(model_path),
        "model_kind": model_file.config.kind,
        "store": store.describe(),
        "split": split,
        "part": part,
        "seed": seed,
        "n_tracks": int(len(positions)),
        "n_seen_in_training": int(len(seen)),
        "n_failed_in_store": int(len(store.failed)),
        "crops": {"length": crop, "count": n_crops},
        "labels": {
            "trained": trained_labels,
            "targets": target_labels,
            "store": store.header.labels,
            "targets_from": targets_from,
        },
        "consistent": bool(consistent),
        "consistency_rule": CONSISTENCY_RULE if consistent else None,
        "metrics": tagging_metrics(y_true, scores, store.genres, prior),
        "levels": level_metrics(y_true, scores, prior, tree),
        "top_level_accuracy": _top_level(store, positions, scores, train_positions),
    }
    arrays = {
        "track_ids": store.track_ids[positions],
        "y_true": y_true,
        "scores": scores,
        "prior": prior,
        "genres": np.array(store.genres),
    }
    if whole_sequence:
        frames = store.item(int(positions[0])).shape[0] if len(positions) else 0
        batch = whole_sequence_batch(model_file.config, max(frames, 1))
        whole = predict_store(model_file.model, store, positions, None, batch_size=batch)
        arrays["scores_whole"] = whole = make_consistent(whole, tree) if consistent else whole
        result["metrics_whole_sequence"] = tagging_metrics(y_true, whole, store.genres, prior)
        result["whole_sequence"] = {"frames": frames, "batch_size": batch}
    if out is not None:
        _write(Path(out), result, arrays)
    return result


def _write(out: Path, result: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write predictions.npz, then `out` (metrics.json): a complete metrics.json marks a complete evaluation."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # Remove the old marker first: a crash between the two writes then leaves no metrics.json
    # beside a predictions.npz it does not describe.
    out.unlink(missing_ok=True)
    atomic_savez(out.with_name("predictions.npz"), **arrays)
    atomic_write_text(out, json.dumps(result, indent=1))


def _positions_or_none(store: FeatureStore, split: str, seed: int) -> np.ndarray:
    """The store positions of `split`'s training part, or none when the split has no training tracks here."""
    try:
        return split_positions(store, "training", split, seed)
    except GenreclfError:
        return np.zeros(0, dtype=np.int64)


def _top_level(store: FeatureStore, positions: np.ndarray, scores: np.ndarray, train_positions: np.ndarray) -> dict:
    """FMA's single-label view: argmax over the top-level genres vs each track's genre_top.

    The baseline always answers the most frequent genre_top of the training split.
    """
    genre_ids = np.asarray(store.genre_ids)
    is_top = genre_ids == np.asarray(store.header.genre_top_level)
    column_of_title = {store.genres[i]: i for i in np.flatnonzero(is_top)}
    tops = store.index["genre_top"].to_numpy(str)
    true_column = np.array([column_of_title.get(t, -1) for t in tops[positions]], dtype=np.int64)
    train_column = np.array([column_of_title.get(t, -1) for t in tops[train_positions]], dtype=np.int64)
    accuracy, n = top_level_accuracy(scores, is_top, true_column)
    known = train_column[train_column >= 0]
    majority = int(np.bincount(known).argmax()) if len(known) else -1
    chance = float(np.mean(true_column[true_column >= 0] == majority)) if n else float("nan")
    return {"accuracy": None if np.isnan(accuracy) else float(accuracy), "n_tracks": int(n), "majority_class": chance}


def fmt(value: float | None, width: int = 0) -> str:
    """Format a metric to 3 decimals, "n/a" where it is undefined (None or nan)."""
    text = "n/a" if value is None or value != value else f"{value:.3f}"
    return f"{text:>{width}}"


def format_table(results: list[dict]) -> str:
    """Return a plain-text table of the summary metrics of one or more evaluations, with chance levels."""
    names = [Path(r["model"]).parent.name or r["model"] for r in results]
    width = max(14, *(len(n) for n in names))
    lines = [f"{'metric':<15}" + "".join(f"{n:>{width + 2}}" for n in names) + f"{'chance':>10}"]
    for key in SUMMARY:
        row = f"{key:<15}" + "".join(fmt(r["metrics"][key], width + 2) for r in results)
        lines.append(row + fmt(results[0]["metrics"]["chance_" + key], 10))
    accs = [r["top_level_accuracy"]["accuracy"] for r in results]
    if all(a is not None for a in accs):
        row = f"{'top-level acc':<15}" + "".join(fmt(a, width + 2) for a in accs)
        lines.append(row + fmt(results[0]["top_level_accuracy"]["majority_class"], 10))
    r0 = results[0]
    if all(r.get("levels") for r in results):
        lines += _levels_table(results, width)
    lines.append(
        f"({r0['n_tracks']} {r0['part']} tracks, {r0['split']} split; mean over {r0['crops']['count']} "
        f"crops of {r0['crops']['length']} frames; chance = prior-only predictor / majority class)"
    )
    for r in results:
        labels = r.get("labels") or {}
        if r.get("consistent") or labels.get("trained") not in (None, labels.get("targets")):
            lines.append(f"({describe_scoring(r)})")
    return "\n".join(lines)


LEVEL_TABLE = ("ap_weighted", "ap_macro")  # the metrics format_table shows per level


def _levels_table(results: list[dict], width: int) -> list[str]:
    """Rows of LEVEL_TABLE's metrics per level of the genre tree (genres with test positives / all)."""
    names = [Path(r["model"]).parent.name or r["model"] for r in results]
    lines = [f"{'per level (genres tested)':<30}" + "".join(f"{n:>{width + 2}}" for n in names) + f"{'chance':>10}"]
    for m in LEVEL_TABLE:
        for k, level in enumerate(results[0]["levels"]):
            name = f"{level_name(level['depth'], short=True)} ({level['n_genres_ap']}/{level['n_genres']})"
            row = f"{m if k == 0 else '':<12}{name:<18}" + "".join(fmt(r["levels"][k][m], width + 2) for r in results)
            lines.append(row + fmt(level[f"chance_{m}"], 10))
    return lines


SHORT_RULE = "a parent scores at least its most probable descendant"


def describe_scoring(result: dict, short: bool = True) -> str:
    """Return one sentence: which labels the model was trained on, which targets it was scored against, how."""
    labels = result.get("labels") or {}
    trained, targets = labels.get("trained") or "unknown labels", labels.get("targets") or "the store's"
    if short:
        store = labels.get("store")
        source = "the store's own" if store in (None, targets) else f"derived from the store's {store}"
        text = f"trained on {trained}, evaluated against {targets} targets ({source})"
    else:
        text = f"trained on {trained}, evaluated against {targets} targets ({labels.get('targets_from', 'the store')})"
    if result.get("consistent"):
        text += f"; scores made hierarchy-consistent ({SHORT_RULE if short else CONSISTENCY_RULE})"
    return text
