"""The model file: one .safetensors file with the weights and, in its metadata, everything
needed to use them (model config, genre vocabulary and tree, signal settings, training provenance,
the training loss, and the per-genre decision thresholds chosen on the validation split).

Loading never unpickles, and refuses a file made for other audio settings.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from genreclf.audio import SignalConfig
from genreclf.errors import GenreclfError, first_line
from genreclf.models import config_from_dict, config_to_dict, model_from_config

FORMAT = "genreclf-model"
VERSION = "1"


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write tensors and string metadata to a .safetensors file atomically; return its path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


@dataclass
class ModelFile:
    """A trained tagger and what it was trained on."""

    model: torch.nn.Module
    config: object  # GRUConfig or TransformerConfig
    genres: list[str]
    genre_ids: list[int]
    signal: SignalConfig = field(default_factory=SignalConfig)
    genre_top_level: list[int] = field(default_factory=list)  # root genre id of each genre
    provenance: dict = field(default_factory=dict)  # store, split, epochs, losses, versions, date
    genre_parents: list[int] = field(default_factory=list)  # parent genre id of each genre, 0 for a root
    thresholds: dict | None = None  # per-genre decision thresholds (genreclf.calibrate); None before calibration
    loss: dict | None = None  # the training loss and its parameters (TrainConfig.loss_record()); None: not recorded

    def save(self, path: str | Path) -> Path:
        """Write the model file atomically; return its path."""
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "config": json.dumps(config_to_dict(self.config)),
            "genres": json.dumps(self.genres),
            "genre_ids": json.dumps([int(g) for g in self.genre_ids]),
            "genre_top_level": json.dumps([int(g) for g in self.genre_top_level]),
            "signal": json.dumps(self.signal.to_dict()),
            "provenance": json.dumps(self.provenance, default=str),
        }
        if self.genre_parents:
            meta["genre_parents"] = json.dumps([int(g) for g in self.genre_parents])
        if self.thresholds is not None:
            meta["thresholds"] = json.dumps(self.thresholds)
        if self.loss is not None:
            meta["loss"] = json.dumps(self.loss)
        return save_tensors(path, self.model.state_dict(), meta)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> ModelFile:
        """Read a model file written by `save`, checking its format and audio settings."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise GenreclfError(f"{path}: no such model file; give the model.safetensors written by `genreclf train`")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        except (SafetensorError, OSError, ValueError) as e:
            raise GenreclfError(
                f"{path}: not a safetensors model file ({first_line(e, 80)}); "
                "give the model.safetensors written by `genreclf train`"
            ) from None
        if meta.get("format") != FORMAT:
            raise GenreclfError(f"{path}: a safetensors file, but not a genreclf model; use one from `genreclf train`")
        if meta.get("version") != VERSION:
            raise GenreclfError(f"{path}: genreclf model format {meta.get('version')}, this genreclf reads {VERSION}")
        try:
            signal = SignalConfig.from_dict(json.loads(meta["signal"]))
            config = config_from_dict(json.loads(meta["config"]))
            genres, genre_ids = json.loads(meta["genres"]), json.loads(meta["genre_ids"])
            # Both are absent from files written before decisions: such a file loads, and predicts.
            genre_parents = json.loads(meta.get("genre_parents", "[]"))
            thresholds = json.loads(meta["thresholds"]) if "thresholds" in meta else None
            provenance = json.loads(meta.get("provenance", "{}"))
            loss = json.loads(meta["loss"]) if "loss" in meta else _loss_before_losses(provenance)
        except (KeyError, TypeError, ValueError) as e:
            raise GenreclfError(
                f"{path}: damaged genreclf model metadata ({type(e).__name__}: {first_line(e, 80)}); "
                "use a model.safetensors written by `genreclf train`"
            ) from None
        SignalConfig().check_same(signal, f"model {path}")
        if not len(genres) == len(genre_ids) == config.n_genres:
            raise GenreclfError(
                f"{path}: {len(genres)} genre names and {len(genre_ids)} ids for a model of "
                f"{config.n_genres} genres; the file is damaged, use one written by `genreclf train`"
            )
        if loss is not None and not (isinstance(loss, dict) and isinstance(loss.get("loss"), str)):
            raise GenreclfError(
                f"{path}: damaged genreclf model metadata (loss {loss!r}); use one written by `genreclf train`"
            )
        if len(genre_parents) not in (0, len(genres)) or (
            thresholds is not None
            and (not isinstance(thresholds, dict) or len(thresholds.get("values") or ()) != len(genres))
        ):
            raise GenreclfError(
                f"{path}: genre parents or thresholds do not match its {len(genres)} genres; the file is "
                "damaged, run `genreclf calibrate` on it again or use one written by `genreclf train`"
            )
        model = model_from_config(config, initialise=False)
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            raise GenreclfError(f"{path}: weights do not fit the stored config ({first_line(e, None)})") from None
        model.to(device).eval()
        return cls(
            model=model,
            config=config,
            genres=genres,
            genre_ids=genre_ids,
            signal=signal,
            genre_top_level=json.loads(meta.get("genre_top_level", "[]")),
            provenance=provenance,
            genre_parents=genre_parents,
            thresholds=thresholds,
            loss=loss,
        )


def _loss_before_losses(provenance: dict) -> dict | None:
    """Return the loss of a model file written before the loss was recorded: bce, then `genreclf train`'s only one."""
    train_config = provenance.get("train_config") if isinstance(provenance, dict) else None
    if not isinstance(train_config, dict):  # not written by `genreclf train`: its training is not known
        return None
    return {"loss": "bce", **({"pos_weight": train_config["pos_weight"]} if "pos_weight" in train_config else {})}


def update_metadata(path: str | Path, entries: dict[str, str]) -> Path:
    """Rewrite a model file atomically with metadata `entries` set, keeping its tensors and other metadata."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    return save_tensors(path, tensors, {**meta, **entries})
