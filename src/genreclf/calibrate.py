"""Per-genre decision thresholds of a trained model, chosen on a validation split and kept in its model file.

Validation probabilities are those `evaluate` computes (the mean over evenly spaced crops of each
track); the rule that turns them into thresholds is `genreclf.decide.RULE`. `train` calls
`validation_thresholds` when a run ends; `calibrate` does the same for a model file written before
thresholds existed (or again, on another store), rewriting only the file's metadata.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from genreclf.crops import CROP_FRAMES, N_CROPS
from genreclf.data import split_positions
from genreclf.decide import MIN_POSITIVES, choose_thresholds
from genreclf.errors import GenreclfError
from genreclf.evaluate import open_scoring, predict_store
from genreclf.modelfile import update_metadata
from genreclf.store import FeatureStore

log = logging.getLogger(__name__)


def validation_thresholds(
    model: torch.nn.Module,
    store: FeatureStore,
    split: str = "official",
    seed: int = 0,
    crop: int = CROP_FRAMES,
    n_crops: int = N_CROPS,
    min_positives: int = MIN_POSITIVES,
    progress: bool = False,
) -> dict:
    """Return the thresholds record of `model` on the validation part of `split`: values, rule and what it saw."""
    positions = split_positions(store, "validation", split, seed)
    probabilities = predict_store(model, store, positions, crop, n_crops, progress=progress)
    chosen = choose_thresholds(probabilities, store.targets[positions], min_positives)
    return {
        **chosen.to_dict(),
        "split": split,
        "part": "validation",
        "seed": int(seed),
        "n_tracks": int(len(positions)),
        "crops": {"length": crop, "count": n_crops},
        "store": str(store.path.resolve()),
    }


def calibrate(
    model_path: str | Path,
    store_path: str | Path,
    split: str | None = None,
    seed: int | None = None,
    crop: int = CROP_FRAMES,
    n_crops: int = N_CROPS,
    min_positives: int = MIN_POSITIVES,
    progress: bool = True,
) -> dict:
    """Choose a model file's thresholds on a store's validation split, write them into the file; return them.

    `split` and `seed` default to those the model was trained with. The file keeps its weights and
    other metadata; the genre tree (parent of each genre) is written too, from the store.
    """
    o = open_scoring(model_path, store_path, split, seed)
    if o.split != o.trained_split or (o.split != "official" and o.seed != o.trained_seed):
        _warn_if_seen(o.store, o.model_path, o.split, o.seed, o.trained_split, o.trained_seed)
    record = validation_thresholds(o.model_file.model, o.store, o.split, o.seed, crop, n_crops, min_positives, progress)
    parents = [int(p) for p in o.store.header.genre_parents]
    update_metadata(o.model_path, {"thresholds": json.dumps(record), "genre_parents": json.dumps(parents)})
    return record


def describe(record: dict) -> str:
    """One line saying how many genres got their own threshold and how many the global one, on what."""
    by = record["chosen_by"]
    own, pooled = by.count("genre"), len(by) - by.count("genre")
    fallback = "the global threshold" if "global" in by else "the fixed threshold"
    return (
        f"{own} genre(s) by their own F1 optimum, {pooled} at {fallback} {record['global']:.3f} "
        f"(fewer than {record['min_positives']} validation positives), on {record['n_tracks']} validation "
        f"tracks of the {record['split']} split"
    )


def _warn_if_seen(store: FeatureStore, model_path: Path, split: str, seed: int, trained: str, trained_seed: int):
    """Warn when validation tracks of `split` were training tracks of the model: their scores flatter it."""
    try:
        seen = np.intersect1d(
            split_positions(store, "validation", split, seed), split_positions(store, "training", trained, trained_seed)
        )
    except GenreclfError:
        return
    if len(seen):
        log.warning(
            "%d validation tracks of the %s split were in the training split of %s: thresholds chosen on them "
            "fit memory, not tagging; calibrate with the split it was trained on",
            len(seen),
            split,
            model_path,
        )
