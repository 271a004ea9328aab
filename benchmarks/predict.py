"""Prediction benchmark: `genreclf predict` against the reference study's prediction recipe, same files, one run.

    pip install -e ".[bench]"
    python benchmarks/predict.py [--files 116] [--seconds 30] [--rounds 2] [--dir DIR]

Writes N synthetic 44.1-kHz stereo CBR MP3s (256 and 320 kbit/s, as FMA's), then for each model
(GRU, Transformer: the reference's sizes, 163 FMA genres, seeded random weights, the same in
both: speed does not depend on them) runs, each in a fresh process, rounds interleaved:
  reference: benchmarks/reference_predict.py (librosa load of every file, pad to 120 s, log-mel,
             8 crops of 320 frames each through the Keras model, then a line per file),
  ours:      genreclf predict MODEL DIR --format json -q (decoder workers, one per core),
and measures from process start to the first result line on stdout and to the end of the job
(both include importing their libraries). Prints per model the best round of each and the
ratios reference / ours, with the range over rounds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import build_corpus, describe_machine

HERE = Path(__file__).resolve().parent
TARGET = 3.0  # whole job and first result: at least this many times the reference's speed
KINDS = ("gru", "transformer")


def make_models(root: Path) -> dict[str, tuple[Path, Path]]:
    """Write our model file and the same weights in Keras for each kind: {kind: (model.safetensors, .h5)}."""
    import reference_keras as rk

    from genreclf.metadata import load_genres
    from genreclf.modelfile import ModelFile
    from genreclf.models import GRUConfig, TransformerConfig, model_from_config

    genres = load_genres()
    root.mkdir(parents=True, exist_ok=True)
    (root / "genres.txt").write_text("\n".join(genres.names) + "\n", encoding="utf-8")
    models = {}
    for kind, config in zip(KINDS, (GRUConfig(), TransformerConfig())):
        torch.manual_seed(0)
        model = model_from_config(config).eval()
        ours = ModelFile(model, config, list(genres.names), [int(i) for i in genres.ids]).save(
            root / kind / "model.safetensors"
        )
        keras_model = rk.build(kind, compile_model=False)
        rk.port_weights(model, keras_model, kind)
        weights = root / kind / "reference.weights.h5"
        keras_model.save_weights(str(weights))
        models[kind] = (ours, weights)
    return models


def timed(cmd: list[str], expect: int) -> tuple[float, float]:
    """Run `cmd`; return (seconds to its first stdout line, seconds to its end); check it printed `expect` lines."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
    first, lines = None, 0
    for line in proc.stdout:
        if first is None:
            first = time.perf_counter() - t0
        lines += bool(json.loads(line).get("genres"))
    err = proc.stderr.read()
    if proc.wait() != 0 or lines != expect:
        raise SystemExit(f"{' '.join(cmd[:4])}...: exit {proc.returncode}, {lines}/{expect} results\n{err[-2000:]}")
    return first, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=116, help="MP3 files to tag")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each file")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each recipe per model")
    parser.add_argument("--dir", type=Path, default=None, help="working folder (kept; the corpus is reused)")
    args = parser.parse_args()

    import tensorflow as tf

    print(f"machine: {describe_machine(f'TensorFlow {tf.__version__}')}")
    root = args.dir or Path(tempfile.mkdtemp(prefix="genreclf-bench-predict-"))
    paths = build_corpus(root / "corpus", args.files, args.seconds, workers=2)[: args.files]
    folder = root / "files"  # exactly the N files, as one folder for `genreclf predict`
    folder.mkdir(parents=True, exist_ok=True)
    for p in paths:
        link = folder / p.name
        if not link.exists():
            link.symlink_to(p)
    files = sorted(folder.iterdir())
    models = make_models(root / "models")
    print(f"{len(files)} MP3s of {args.seconds:g} s (44.1 kHz stereo) in {folder}; {args.rounds} rounds\n")

    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in range(args.rounds):
        for kind in KINDS:
            ours, weights = models[kind]
            commands = {
                "reference": [sys.executable, str(HERE / "reference_predict.py"), kind, str(weights)]
                + [str(root / "models" / "genres.txt"), *map(str, files)],
                "genreclf": [sys.executable, "-m", "genreclf", "predict", str(ours), str(folder), "--format", "json"]
                + ["-q"],
            }
            for recipe, cmd in commands.items():
                first, total = timed(cmd, len(files))
                results.setdefault((kind, recipe), []).append((first, total))
                print(f"  round {r + 1} {kind:<11} {recipe:<9} first result {first:6.2f} s, all {total:6.2f} s")

    print(f"\n{'model':<12}{'recipe':<11}{'first result':>14}{'whole job':>11}{'files/s':>9}  (best of {args.rounds})")
    verdicts = []
    for kind in KINDS:
        ref, ours = np.array(results[kind, "reference"]), np.array(results[kind, "genreclf"])
        for recipe, runs in (("reference", ref), ("genreclf", ours)):
            best = runs.min(0)
            print(f"{kind:<12}{recipe:<11}{best[0]:12.2f} s{best[1]:9.2f} s{len(files) / best[1]:9.2f}")
        ratios = ref.min(0) / ours.min(0)
        spread = [(ref[:, j, None] / ours[None, :, j]).ravel() for j in (0, 1)]  # every pair of rounds
        print(
            f"{'':<12}{'ratio':<11}{ratios[0]:11.2f}x{ratios[1]:10.2f}x"
            f"   (over rounds: first {spread[0].min():.2f}-{spread[0].max():.2f}x, "
            f"whole {spread[1].min():.2f}-{spread[1].max():.2f}x)"
        )
        verdicts.append(all(ratios >= TARGET))
    verdict = "met" if all(verdicts) else "NOT met"
    print(f"\ntarget >= {TARGET:g}x for both models, first result and whole job: {verdict}")


if __name__ == "__main__":
    main()
