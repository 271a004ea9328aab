"""compare.md, compare.png and the printed summary of `genreclf compare` (compare.json's content)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from genreclf.atomic import atomic_save_png
from genreclf.metrics import DESCRIPTIONS, SUMMARY
from genreclf.report_markdown import SMALL_TEST_SET

HEADLINE = "ap_weighted"  # the reference study's number
DPI = 120


def _f(x: float | None, sign: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.3f}" if sign else f"{x:.3f}"


def _span(low: float | None, high: float | None, sign: bool = False) -> str:
    return f"[{_f(low, sign)}, {_f(high, sign)}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def _seeds(s: dict) -> str:
    seeds = s["seeds"]
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"


def format_text(s: dict) -> str:
    """Return the plain-text summary `genreclf compare` prints: each model's mean, sd and interval; the verdicts."""
    heads = [f"{m} ({len(s['seeds'])} seeds)" for m in s["models"]]
    rows = {
        metric: [
            f"{_f(m['mean'])} ± {_f(m['sd'])} {_span(m['low'], m['high'])}" for m in s["metrics"][metric]["models"]
        ]
        for metric in SUMMARY
    }
    width = max(len(c) for c in heads + [c for cells in rows.values() for c in cells]) + 3
    lines = [f"{'':<15}" + "".join(f"{h:>{width}}" for h in heads)]
    lines += [f"{metric:<15}" + "".join(f"{c:>{width}}" for c in cells) for metric, cells in rows.items()]
    lines.append(
        f"mean ± sd over seeds [95% interval over seeds and test tracks]; {s['n_tracks']} test tracks "
        f"of the {s['split']} split"
    )
    for metric in SUMMARY:
        for p in s["metrics"][metric]["pairs"]:
            lines.append(f"{metric}: {p['verdict']}")
    return "\n".join(lines)


def _verdicts(s: dict) -> list[str]:
    lines = ["## Verdict", ""]
    for metric in SUMMARY:
        for p in s["metrics"][metric]["pairs"]:
            bold = "**" if metric == HEADLINE else ""
            lines.append(f"- {bold}`{metric}`: {p['verdict']}{bold}.")
    if not any(s["metrics"][m]["pairs"] for m in SUMMARY):
        lines.append("- One model only: nothing to compare it with; its spread over seeds is below.")
    return lines + [""]


def _per_model(s: dict) -> list[str]:
    lines = [
        "## Per model",
        "",
        "Each model's mean over its seeds, the standard deviation across them, and a 95% interval that covers "
        "both the seeds (other seeds would train other models) and the test tracks (other tracks would score "
        "them otherwise); for contrast, the two-stage bootstrap and each seed's own track-only BCa interval, "
        "the one `genreclf report` gives a single run.",
        "",
    ]
    for metric in SUMMARY:
        block = s["metrics"][metric]
        lines += [f"### `{metric}` (chance {_f(block['chance'])})", ""]
        rows = [
            [
                m["model"],
                m["n_seeds"],
                _f(m["mean"]),
                _f(m["sd"]),
                _span(m["low"], m["high"]),
                f"{100 * m['seed_share']:.0f}%" if m["seed_share"] is not None else "n/a",
                _span(m["two_stage_low"], m["two_stage_high"]),
                "; ".join(f"{_f(r['value'])} {_span(r['low'], r['high'])}" for r in m["per_seed"]),
            ]
            for m in block["models"]
        ]
        lines += _table(
            [
                "model",
                "seeds",
                "mean",
                "sd over seeds",
                "95% interval, seeds and tracks",
                "variance from seeds",
                "two-stage bootstrap",
                "each seed: value [track-only interval]",
            ],
            rows,
        )
    return lines + [f"- `{m}`: {DESCRIPTIONS[m]}." for m in SUMMARY] + [""]


def _differences(s: dict) -> list[str]:
    pairs = [p for m in SUMMARY for p in s["metrics"][m]["pairs"]]
    if not pairs:
        return []
    lines = [
        "## Differences",
        "",
        "The difference of the means over seeds, with its 95% interval over seeds and test tracks (both models "
        "scored on the same tracks: paired). For contrast: the two-stage bootstrap, and the paired interval over "
        "test tracks alone, which treats these seeds' models as the only ones there could be.",
        "",
    ]
    rows = [
        [
            f"`{p['metric']}`",
            f"{p['a']} − {p['b']} = {_f(p['diff'], True)}",
            _span(p["low"], p["high"], True),
            f"{p['df']:.1f}" if p["df"] is not None else "∞",
            _span(p["two_stage_low"], p["two_stage_high"], True),
            _span(p["tracks_only_low"], p["tracks_only_high"], True),
            f"{100 * p['frac_a_better']:.0f}%" if p["frac_a_better"] is not None else "n/a",
            "excludes 0" if p["excludes_zero"] else "includes 0",
        ]
        for p in pairs
    ]
    return lines + _table(
        [
            "metric",
            "difference",
            "95% interval, seeds and tracks",
            "degrees of freedom",
            "two-stage bootstrap",
            "tracks only",
            "first better in (two-stage resamples)",
            "interval",
        ],
        rows,
    )


def _method(s: dict) -> list[str]:
    lines = [
        "## How the intervals are made",
        "",
        f"Every run is scored on the same {s['n_tracks']} test tracks, and on the same {s['n_boot']} bootstrap "
        "resamples of them. A model's mean over S seeds varies for two reasons: the seeds (the variance of "
        "the seeds' values over S, with S − 1 degrees of freedom) and the tracks (the variance of the mean "
        "over the track resamples). The interval is the mean ± t × √(sum of both), with Welch–Satterthwaite "
        "degrees of freedom, clipped to the metric's range; for a difference, the seed parts of both models "
        "add up and the track part is that of the paired difference. With 3 seeds the seed part has 2 degrees "
        "of freedom, and t is 4.3, not 1.96: three values say little about their own spread, which a bootstrap "
        "over seeds cannot see. Simulated (`benchmarks/interval_coverage.py --mode seeds`), this interval "
        "covered the population difference 93-97% of the time with 3 or 5 seeds on 30 or 100 tracks; the "
        "two-stage bootstrap 85-96%, and the intervals over tracks alone 40-69%.",
        "",
    ]
    if s["n_tracks"] < SMALL_TEST_SET:
        lines += [
            f"**Caution: {s['n_tracks']} test tracks.** On so few, the per-genre AP averages (`ap_weighted`, "
            "`ap_macro`) of every run come out above what it would score on many tracks, so the models' "
            "intervals are too low to contain their population values; differences, where that bias "
            "largely cancels, are what to read.",
            "",
        ]
    return lines


def _runs(s: dict) -> list[str]:
    lines = ["## Runs", ""]
    rows = [
        [
            f"`{r['run_dir']}`",
            r["model"],
            r.get("loss") or "bce",
            r["seed"],
            r["epochs"],
            _f(r["best_val_loss"]),
            f"{r['train_seconds']:.0f}" if r["train_seconds"] is not None else "n/a",
            _f(r["top_level_accuracy"]),
        ]
        for r in s["runs"]
    ]
    lines += _table(
        ["run", "model", "loss", "seed", "epochs", "best val_loss", "training time (s)", "top-level accuracy"], rows
    )
    fit = ", ".join(f"{k} {v}" for k, v in s["fit"].items() if v is not None)
    optim = ", ".join(f"{k} {v}" for k, v in s["train_config"].items())
    losses = "; ".join(", ".join(f"{k} {v}" for k, v in record.items()) for record in s.get("losses", {}).values())
    return lines + [f"Training settings of every run: {fit}; {optim}. Losses: {losses}.", ""]


def render(s: dict) -> str:
    """Return compare.md for the summary written to compare.json."""
    lines = [
        "# Model comparison over training seeds",
        "",
        f"{', '.join(s['models'])}: {_seeds(s)} of each, trained with the same settings on `{s['store']}` "
        f"({s['store_description']}) and scored on the same {s['n_tracks']} {s['part']} tracks of the "
        f"{s['split']} split. Generated {s['generated']} by genreclf {s['genreclf']} "
        f"(git revision {s['git'] or 'none: not a source checkout'}).",
        "",
    ]
    lines += _verdicts(s) + ["![Each seed and each model's interval](compare.png)", ""]
    lines += _per_model(s) + _differences(s) + _method(s) + _runs(s)
    return "\n".join(lines)


def figure(s: dict, path: Path) -> Path:
    """Draw each seed's value (track-only interval) and each model's mean (seeds-and-tracks interval); return path."""
    models = s["models"]
    fig = Figure(figsize=(3.2 * len(SUMMARY), 0.8 * len(models) + 1.8), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(SUMMARY), sharey=True)
    for ax, metric in zip(np.atleast_1d(axes), SUMMARY):
        block = s["metrics"][metric]
        for i, m in enumerate(block["models"]):
            offsets = np.linspace(-0.25, -0.1, len(m["per_seed"]))
            for dy, r in zip(offsets, m["per_seed"]):
                value, low, high = (np.nan if v is None else v for v in (r["value"], r["low"], r["high"]))
                ax.plot([low, high], [i + dy] * 2, color=f"C{i}", alpha=0.4, linewidth=1)
                ax.plot([value], [i + dy], "o", color=f"C{i}", markersize=3, alpha=0.8)
            mean, low, high = (np.nan if v is None else v for v in (m["mean"], m["low"], m["high"]))
            ax.errorbar([mean], [i + 0.12], xerr=[[mean - low], [high - mean]], fmt="D", color=f"C{i}", capsize=4)
        if block["chance"] is not None:
            ax.axvline(block["chance"], color="0.5", linestyle=":", label="chance")
        ax.set_title(metric)
        ax.set_xlim(0, 1)
        ax.grid(axis="x", alpha=0.3)
    first = np.atleast_1d(axes)[0]
    first.set_yticks(range(len(models)), [f"{m} ({len(s['seeds'])} seeds)" for m in models])
    first.set_ylim(len(models) - 0.5, -0.5)
    first.legend(loc="lower right", fontsize="small")
    fig.suptitle(
        "Dots: each seed (line: its 95% interval over test tracks); diamond: mean over seeds "
        "(bar: 95% interval over seeds and tracks)",
        fontsize="medium",
    )
    FigureCanvasAgg(fig)
    atomic_save_png(path, fig)
    return path
