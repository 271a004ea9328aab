"""`genreclf demo --pretraining`: does masked-frame pretraining help the Transformer? Measured on the demo's data.

After the demo (its store and its Transformer trained from scratch), the encoder is pretrained
on the training tracks (no labels; the validation tracks give its val loss) with each masking: ours ("span": spans of 8
frames replaced by a learned vector) and the reference's ("reference": its random_mask, masked
frames set to 0, input masked and target clean); a Transformer is fine-tuned from each with the
demo's settings, and all three are evaluated on the test split. Every number is computed by the
run on the synthetic corpus.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from genreclf.atomic import atomic_write_text
from genreclf.config import MASKINGS, FitConfig, PretrainConfig, TrainConfig
from genreclf.demo import DEMO_BATCH, DEMO_LR
from genreclf.errors import GenreclfError
from genreclf.evaluate import evaluate, fmt
from genreclf.metrics import SUMMARY
from genreclf.train import pretrain, train

log = logging.getLogger(__name__)


def run_pretraining_demo(out: str | Path, epochs: int = 14, seed: int = 0, progress: bool = True) -> dict:
    """Pretrain with each masking, fine-tune, and compare with the demo's Transformer from scratch."""
    out = Path(out)
    store, scratch = out / "store", out / "runs" / "transformer"
    if not (scratch / "model.safetensors").exists():
        raise GenreclfError(f"{out} has no demo Transformer: run `genreclf demo --out {out}` first")
    fit = FitConfig(model="transformer", epochs=epochs, batch_size=DEMO_BATCH, seed=seed, workers=0)
    runs = {"from scratch": scratch}
    pretraining = {}
    for masking in MASKINGS:
        pre_dir, run_dir = out / "runs" / f"pretrain_{masking}", out / "runs" / f"transformer_pretrained_{masking}"
        encoder = pre_dir / "encoder.safetensors"
        if not encoder.exists():
            log.info("demo: pretraining the encoder with %s masking", masking)
            result = pretrain(store, pre_dir, fit, PretrainConfig(masking=masking, lr=DEMO_LR), progress=progress)
            pretraining[masking] = {"epochs": result.epochs, "best_val_mae": result.best_val_loss}
        if not (run_dir / "model.safetensors").exists():
            log.info("demo: fine-tuning the Transformer from the %s-masking encoder", masking)
            tuned = dataclasses.replace(fit, pretrained=str(encoder))
            train(store, run_dir, tuned, TrainConfig(lr=DEMO_LR), progress=progress)
        runs[f"pretrained, {masking} masking"] = run_dir
    results = {name: evaluate(d, store, out=d / "metrics.json", progress=False) for name, d in runs.items()}
    table = _table(results)
    print()
    print("Transformer from scratch vs pretrained (masked frames, no labels) then fine-tuned, on the demo's test split")
    print(table)
    summary = {"epochs": epochs, "pretraining": pretraining, "results": results, "table": table}
    atomic_write_text(out / "pretraining.json", json.dumps(summary, indent=1, default=str))
    return summary


def _table(results: dict[str, dict]) -> str:
    names = list(results)
    width = max(len(n) for n in names) + 2
    lines = [f"{'':<26}" + "".join(f"{n:>{width}}" for n in names)]
    for key in SUMMARY:
        lines.append(f"{key:<26}" + "".join(fmt(results[n]["metrics"][key], width) for n in names))
    lines.append(
        f"{'top-level genre accuracy':<26}"
        + "".join(fmt(results[n]["top_level_accuracy"]["accuracy"], width) for n in names)
    )
    first = next(iter(results.values()))
    lines.append(f"test split: {first['n_tracks']} tracks; every run trained with the demo's settings")
    return "\n".join(lines)
