"""report.md: the report's numbers (report.json's content) as Markdown, with the figures."""

from __future__ import annotations

from genreclf.hierarchy import level_name
from genreclf.metrics import DESCRIPTIONS, SUMMARY

SMALL_TEST_SET = 1000  # tracks; below this the report warns that averaged per-genre AP is biased upward


def _f(x: float | None, digits: int = 3, sign: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _ci(m: dict, sign: bool = False) -> str:
    return (
        f"{_f(m['value'] if 'value' in m else m['diff'], sign=sign)} [{_f(m['low'], sign=sign)}, "
        f"{_f(m['high'], sign=sign)}]"
    )


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def _verdict(c: dict) -> str:
    if c["low"] is None or c["high"] is None:
        return "undefined on these tracks"
    if c["excludes_zero"]:
        better, worse = (c["run"], c["baseline"]) if c["diff"] > 0 else (c["baseline"], c["run"])
        return f"the interval excludes 0: {better} beats {worse}"
    return "the interval includes 0: no clear difference"


def _provenance(s: dict) -> list[str]:
    runs = s["runs"]
    lines = ["## What was measured", ""]
    lines += _table(
        [
            "run",
            "model",
            "parameters",
            "epochs",
            "trained on split",
            "evaluated on split",
            "tracks evaluated",
            "failed tracks in store",
            "labels",
            "subset",
            "git revision",
            "trained",
        ],
        [
            [
                r["name"],
                r["model_kind"],
                f"{r['parameters']:,}" if r["parameters"] else "n/a",
                r["epochs"],
                r["trained_split"],
                r["evaluated_split"],
                r["n_tracks"],
                r["n_failed_in_store"],
                r["labels"],
                r["subset"],
                r["git"] or "-",
                r["trained"],
            ]
            for r in runs
        ],
    )
    for r in runs:
        lines.append(
            f"- **{r['name']}**: `{r['run_dir']}`; store `{r['store']}` ({r['store_description']}); "
            f"{r['train_tracks']} training tracks."
        )
        if r["trained_split"] != r["evaluated_split"]:
            lines.append(
                f"  - Warning: trained on the {r['trained_split']} split but evaluated on the "
                f"{r['evaluated_split']} split, whose test tracks may include its training tracks."
            )
        if not r["checked_against_store"]:
            lines.append("  - Warning: the store was not available; its metrics.json was used without checking it.")
        sc = r.get("scoring") or {}
        if sc.get("trained") and sc.get("targets") not in (None, sc["trained"]):
            lines.append(
                f"  - Trained on `{sc['trained']}`, evaluated against `{sc['targets']}` targets: {sc['targets_from']}."
            )
        if sc.get("consistent"):
            lines.append(f"  - Scores made hierarchy-consistent before any metric: {sc['consistency_rule']}.")
    return lines + [""]


def _metrics(s: dict, group: dict) -> list[str]:
    runs = [r for r in s["runs"] if r["name"] in group["runs"]]
    lines = [f"### Tagging metrics ({group['n_tracks']} test tracks)", ""]
    rows = [[m, _f(runs[0]["metrics"][m]["chance"])] + [_ci(r["metrics"][m]) for r in runs] for m in SUMMARY]
    lines += _table(["metric", "chance"] + [r["name"] for r in runs], rows)
    lines += [f"- `{m}`: {DESCRIPTIONS[m]}." for m in SUMMARY]
    lines += ["", _macro_genres(runs[0]["macro_genres"])]
    lines += [
        "",
        "Values are point estimates with 95% BCa bootstrap intervals over test tracks "
        f"({s['n_boot']} resamples). Chance is the prior-only predictor (the training prevalence of each "
        "genre as a constant score): its AP for a genre is the genre's test prevalence, its ROC-AUC 0.5.",
        "",
    ]
    if group["n_tracks"] < SMALL_TEST_SET:
        lines += [
            f"**Caution: {group['n_tracks']} test tracks.** On so few, the per-genre AP averages "
            "(`ap_weighted`, `ap_macro`) overestimate what the model would score on many tracks, and their "
            "intervals are too narrow; `ap_micro` and `roc_auc_macro` are nearly unbiased. In a simulation "
            "(`benchmarks/interval_coverage.py`), ap_weighted on 30 tracks came out 0.09 above its population "
            f"value, whose interval contained it 37% of the time (92% on 1000 tracks). Compare runs on the "
            "same tracks (the paired differences below), not with numbers measured on other test sets.",
            "",
        ]
    if group["comparisons"]:
        lines += [
            "### Paired differences",
            "",
            "Both runs are scored on the same bootstrap resample of the test tracks each time, so the "
            "interval is for the difference itself.",
            "",
        ]
        lines += _table(
            ["metric", "difference", "95% interval", "run better in", "verdict"],
            [
                [
                    c["metric"],
                    f"{c['run']} − {c['baseline']} = {_f(c['diff'], sign=True)}",
                    f"[{_f(c['low'], sign=True)}, {_f(c['high'], sign=True)}]",
                    f"{100 * c['frac_run_better']:.0f}% of resamples" if c["frac_run_better"] is not None else "n/a",
                    _verdict(c),
                ]
                for c in group["comparisons"]
            ],
        )
    return lines


def _macro_genres(g: dict) -> str:
    return (
        f"The macro averages are means over a fixed set of genres, those present in the full test set: "
        f"`ap_macro` over the {g['ap_macro']} of the {g['of']} genres with a positive test track, "
        f"`roc_auc_macro` over the {g['roc_auc_macro']} with a positive and a negative. Every bootstrap "
        "resample averages the same genres; a resample that misses all positives (or negatives) of a genre "
        "holds no information on it, so that genre keeps its full-set value there. Dropping it instead "
        "would average mostly frequent, better-scored genres in those resamples and push the interval up."
    )


def _scoring_sentence(r: dict) -> str:
    sc = r.get("scoring") or {}
    targets = f"`{sc['targets']}`" if sc.get("targets") else "the store's"
    trained = f"`{sc['trained']}`" if sc.get("trained") else "labels not recorded"
    how = "made hierarchy-consistent" if sc.get("consistent") else "as the model gives them"
    return f"- **{r['name']}**: trained on {trained}, evaluated against {targets} targets; scores {how}."


def _levels(s: dict) -> list[str]:
    lines = [
        "## Per level of the genre tree",
        "",
        "FMA's genres form a tree (genres.csv): level 1 holds the 16 top-level genres (Rock, Electronic, ...), "
        "level 2 their sub-genres (Metal), level 3 theirs (Death-Metal), and so on. Each level's metrics use the "
        "columns of its genres alone, so a model that finds the broad genre but not the sub-genre scores high on "
        "level 1 and low below it. Against `genres` targets, a track counts as a positive only for the genres it "
        "was tagged with (a track tagged Metal alone is no Rock positive); against `genres_all`, for those and all "
        'their ancestors, so every tagged track counts for its top-level genre. "genres tested" counts the genres '
        "with a positive test track; chance is the prior-only predictor, random ranking the expected AP of random "
        "scores. Point estimates, without intervals.",
        "",
    ]
    lines += [_scoring_sentence(r) for r in s["runs"]] + [""]
    for g in s["groups"]:
        runs = [r for r in s["runs"] if r["name"] in g["runs"] and r.get("levels")]
        if not runs:
            lines += [f"{g['split'].capitalize()} split: the model files store no genre tree.", ""]
            continue
        lines += [f"### {g['split'].capitalize()} split ({g['n_tracks']} test tracks)", ""]
        rows = []
        for k, level in enumerate(runs[0]["levels"]):
            name = level_name(level["depth"])
            for j, m in enumerate(SUMMARY):
                rows.append(
                    [
                        name if j == 0 else "",
                        f"{level['n_genres_ap']} of {level['n_genres']}" if j == 0 else "",
                        m,
                        _f(level.get(f"chance_{m}")),
                        _f(level.get(f"random_{m}")) if f"random_{m}" in level else "-",
                    ]
                    + [_f(r["levels"][k][m]) for r in runs]
                )
        header = ["level", "genres tested", "metric", "chance", "random ranking"] + [r["name"] for r in runs]
        lines += _table(header, rows)
    return lines


def _top_level(s: dict) -> list[str]:
    lines = [
        "## FMA's single-label view: top-level genre accuracy",
        "",
        "The argmax over the 16 top-level genres against each track's `genre_top` (tracks without one "
        "are left out), next to always answering the most frequent `genre_top`.",
        "",
    ]
    rows = []
    for r in s["runs"]:
        t = r["top_level"] or {}
        rows.append(
            [
                r["name"],
                r["evaluated_split"],
                _f(t.get("accuracy")),
                t.get("n_tracks", "n/a"),
                _f(t.get("majority_class")),
            ]
        )
    return lines + _table(["run", "split", "accuracy", "tracks with genre_top", "majority-class baseline"], rows)


def _crops(s: dict) -> list[str]:
    lines = [
        "## Effect of crop averaging",
        "",
        "Scores of the whole sequence at once against the mean over evenly spaced crops (the reference's "
        "test-time augmentation; short tracks get fewer crops). The gain is crops − whole, with its paired "
        "95% bootstrap interval for ap_weighted.",
        "",
    ]
    unmeasured = [r["name"] for r in s["runs"] if r["crop_averaging"]["whole"] is None]
    if unmeasured:
        lines += [
            f"Whole-sequence scores were not measured for {', '.join(unmeasured)}: the models were trained on "
            "crops of at most 256 frames, so whole 938-frame sequences are scored only when asked for "
            "(`genreclf evaluate --whole-sequence`, or `build_report(..., whole_sequence=True)`).",
            "",
        ]
    rows = []
    for r in s["runs"]:
        c = r["crop_averaging"]
        crops = c["crops"] or {}
        if c["whole"] is None:
            continue
        for m in SUMMARY:
            whole, mean = c["whole"][m], c["crops_mean"][m]
            gain = _f(mean - whole, sign=True) if None not in (whole, mean) else "n/a"
            if m == "ap_weighted":
                d = c["ap_weighted_diff"]
                gain += f" [{_f(d['low'], sign=True)}, {_f(d['high'], sign=True)}]"
            rows.append([r["name"], m, _f(whole), _f(mean), gain])
        rows[-len(SUMMARY)][0] += f" (up to {crops.get('count', '?')} crops of {crops.get('length', '?')} frames)"
    return lines + (_table(["run", "metric", "whole sequence", "mean of crops", "gain"], rows) if rows else [])


def _per_genre(group: dict) -> list[str]:
    runs = group["runs"]
    lines = [
        f"### Per-genre results, {group['split']} split ({len(group['per_genre'])} genres with test support)",
        "",
        f"![Per-genre AP](per_genre_ap_{group['split']}.png)",
        "",
    ]
    rows = [
        [r["genre"], r["support"], _f(r["prevalence"])]
        + [_f(r["ap"][n]) for n in runs]
        + [_f(r["roc_auc"][n]) for n in runs]
        for r in group["per_genre"]
    ]
    return lines + _table(
        ["genre", "support", "chance AP"] + [f"AP {n}" for n in runs] + [f"ROC-AUC {n}" for n in runs], rows
    )


def render(s: dict) -> str:
    """Return report.md for the summary written to report.json."""
    names = ", ".join(r["name"] for r in s["runs"])
    lines = [
        "# Genre tagging report",
        "",
        f"Runs: {names}. Generated {s['generated']} by genreclf {s['genreclf']} "
        f"(git revision {s['git'] or 'none: not a source checkout'}); "
        f"every number is on the {s['part']} part of a split.",
        "",
    ]
    lines += _provenance(s)
    lines += ["## Summary metrics", "", "![Summary metrics](metrics.png)", ""]
    for g in s["groups"]:
        lines += [f"## {g['split'].capitalize()} split", ""] + _metrics(s, g)
    if len(s["groups"]) > 1:
        lines += [
            "Runs evaluated on different splits are scored on different test tracks, so they are not "
            "compared pairwise; the random reference split lets one artist's tracks fall on both sides, "
            "so the gap between a model's scores on the two splits shows how much the leaky split "
            "inflates them.",
            "",
        ]
    lines += _levels(s) + _top_level(s) + _crops(s)
    lines += ["## Per-genre results", ""]
    for g in s["groups"]:
        lines += _per_genre(g)
    lines += ["## Precision-recall curves", ""]
    for g in s["groups"]:
        if g["pr_genres"]:
            lines += [
                f"{g['split'].capitalize()} split: {', '.join(g['pr_genres'])}.",
                "",
                f"![Precision-recall curves](pr_curves_{g['split']}.png)",
                "",
            ]
    if "learning_curves.png" in s["figures"]:
        lines += [
            "## Learning curves",
            "",
            "Training (solid) and validation (dashed) loss per epoch; the model "
            "kept is the epoch with the lowest validation loss.",
            "",
            "![Learning curves](learning_curves.png)",
            "",
        ]
    return "\n".join(lines)
