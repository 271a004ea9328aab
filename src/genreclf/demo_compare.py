"""`genreclf demo --compare` (`make compare-demo`): the demo's GRU vs Transformer, over 3 training seeds each.

After the demo (its store), `genreclf compare` trains seeds 0-2 of both models with the demo's settings
(seed 0's runs repeat the demo's own), evaluates them on the demo's test split and writes its report to
OUT/compare/. Every number is computed by the run on the synthetic corpus.
"""

from __future__ import annotations

import time
from pathlib import Path

from genreclf.compare import compare_models
from genreclf.compare_report import format_text
from genreclf.config import FitConfig, TrainConfig
from genreclf.demo import DEMO_BATCH, DEMO_LR
from genreclf.errors import GenreclfError

SEEDS = 3  # per model: the fewest for which a standard deviation means something


def run_compare_demo(out: str | Path, seeds: int = SEEDS, epochs: int = 14, progress: bool = True) -> dict:
    """Train `seeds` seeds of the GRU and the Transformer on the demo's store, compare them; return the summary."""
    out = Path(out)
    store = out / "store"
    if not store.is_dir():
        raise GenreclfError(f"{out} has no demo store: run `genreclf demo --out {out}` first")
    t0 = time.perf_counter()
    fit = FitConfig(epochs=epochs, batch_size=DEMO_BATCH, workers=0)
    result = compare_models(
        store, out / "compare", seeds=seeds, fit=fit, optim=TrainConfig(lr=DEMO_LR), progress=progress
    )
    seconds = time.perf_counter() - t0
    print()
    print(f"GRU vs Transformer over {seeds} training seeds each, on the demo's test split")
    print(format_text(result.summary))
    print(
        f"compare report: {result.markdown} ({seconds:.0f} s, {len(result.trained)} of "
        f"{len(result.summary['runs'])} runs trained this time)"
    )
    return result.summary
