"""The `genreclf` command: thin wrappers that parse arguments and call the Python API."""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import inspect
import io
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from genreclf import __version__
from genreclf.errors import GenreclfError

log = logging.getLogger("genreclf")


def fatal(message: str, code: int = 2) -> int:
    """Print a one-line error for the user and return the exit code."""
    print(f"genreclf: error: {message}", file=sys.stderr)
    return code


def _shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes K/N (e.g. 0/4), not {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= K < N")
    return k, n


def _int_at_least(minimum: int):
    """Return an argparse type for whole numbers >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, not {text!r}")
        return value

    return parse


_positive_int, _count = _int_at_least(1), _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, not {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, not {value}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability between 0 and 1, not {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability between 0 and 1, not {value}")
    return value


def _number_or_none(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or none, not {text!r}") from None


def _step_seconds(text: str) -> float:
    from genreclf.timeline import check_step

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds per timeline segment, e.g. 10, not {text!r}") from None
    try:
        return check_step(value)
    except GenreclfError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# --- commands -------------------------------------------------------------------------------


def cmd_synth(args: argparse.Namespace) -> int:
    from genreclf.synth import make_corpus

    out = make_corpus(
        args.out,
        args.tracks,
        seconds=args.seconds,
        seed=args.seed,
        workers=args.workers,
        n_genres=args.genres,
        zipf=args.zipf,
    )
    print(f"wrote a synthetic FMA-layout corpus of {args.tracks} tracks to {out}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from genreclf.download import download

    folders = download(
        args.subset, args.to, base_url=args.url, keep_archives=not args.delete_archives, progress=not args.quiet
    )
    print(f"FMA {args.subset} is in {args.to}: {', '.join(str(f) for f in folders)}")
    print(
        f"next: genreclf featurize --data {args.to} --out STORE"
        + ("" if args.subset == "metadata" else f" --subset {args.subset}")
    )
    return 0


def cmd_featurize(args: argparse.Namespace) -> int:
    from genreclf.featurize import featurize

    result = featurize(
        args.data,
        args.out,
        subset=args.subset,
        labels=args.labels,
        audio_dir=args.audio,
        workers=args.workers,
        shard=args.shard,
        min_seconds=args.min_seconds,
        device=args.device,
        retry_failed=args.retry_failed,
        progress=not args.quiet,
        clip_timeout=args.clip_timeout,
    )
    rate = result.done / result.seconds if result.seconds else 0.0
    print(
        f"{result.store}: {result.done} of {result.tracks} tracks featurized, {result.failed} failed "
        f"({result.silent} of them silent; listed in failed.csv), {result.seconds:.1f} s this run ({rate:.1f} clips/s)"
    )
    if not result.complete:
        print(f"{result.store}: other shards are still to be featurized before the store can be read")
    return 0


def _fit_config(args: argparse.Namespace, model: str):
    from genreclf.config import FitConfig

    return FitConfig(
        model=model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        min_crop=args.min_crop,
        max_crop=args.max_crop,
        val_crop=args.max_crop,
        split=args.split,
        seed=args.seed,
        workers=args.workers,
        early_stopping=args.early_stopping,
        pretrained=getattr(args, "pretrained", None),
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        cache=args.cache,
        precision=args.precision,
        set_lr=args.set_lr,
    )


def _train_config(args: argparse.Namespace, loss: str | None = None) -> Any:
    """The TrainConfig (optimiser and loss) of train's and compare's options.

    With `loss` (compare --losses): that loss, with its own parameters from the options, the others' left at
    their defaults; without: --loss, and a parameter given for another loss is refused.
    """
    from genreclf.config import LOSS_PARAMETERS, TrainConfig

    given = LOSS_PARAMETERS[loss] if loss else [name for names in LOSS_PARAMETERS.values() for name in names]
    return TrainConfig(
        lr=args.lr,
        weight_decay=args.weight_decay,
        plateau_patience=args.plateau_patience,
        loss=loss or args.loss,
        **{name: getattr(args, name) for name in given},
    )


def _compare_configs(args: argparse.Namespace) -> Any:
    """compare's TrainConfig, or one per loss of --losses (a parameter of a loss not compared is refused)."""
    from genreclf.config import LOSS_PARAMETERS, TrainConfig

    if not args.losses:
        return _train_config(args)
    for loss, names in LOSS_PARAMETERS.items():
        for name in names:
            if loss not in args.losses and getattr(args, name) != _default(TrainConfig, name):
                raise GenreclfError(
                    f"--{name.replace('_', '-')} is a parameter of loss {loss!r}, which --losses does not compare"
                )
    return [_train_config(args, loss) for loss in args.losses]


def cmd_train(args: argparse.Namespace) -> int:
    from genreclf.train import train

    optim = _train_config(args)
    result = train(
        args.store, args.out, _fit_config(args, args.model), optim, resume=args.resume, progress=not args.quiet
    )
    if not result.reporter:  # another DDP process: rank 0 says it
        return 0
    print(
        f"{args.model}: {result.parameters:,} parameters, {result.epochs} epochs in {result.seconds:.0f} s, "
        f"best val_loss {result.best_val_loss:.4f} ({args.loss}); model written to {result.model_path}"
    )
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from genreclf.config import PretrainConfig
    from genreclf.train import pretrain

    optim = PretrainConfig(
        masking=args.masking, lr=args.lr, mask_ratio=args.mask_ratio, plateau_patience=args.plateau_patience
    )
    result = pretrain(
        args.store, args.out, _fit_config(args, "transformer"), optim, resume=args.resume, progress=not args.quiet
    )
    if not result.reporter:
        return 0
    print(
        f"pretrained the transformer encoder ({result.parameters:,} parameters) for {result.epochs} epochs, "
        f"best masked-frame val MAE {result.best_val_loss:.4f}; encoder written to {result.model_path} "
        f"(use it with `genreclf train --model transformer --pretrained {result.model_path}`)"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from genreclf.evaluate import evaluate, format_table

    out = args.out or (Path(args.model) if Path(args.model).is_dir() else Path(args.model).parent) / "metrics.json"
    result = evaluate(
        args.model,
        args.store,
        split=args.split,
        part=args.part,
        crop=args.crop,
        n_crops=args.crops,
        seed=args.seed,
        whole_sequence=args.whole_sequence,
        targets=args.targets,
        consistent=args.consistent,
        out=out,
        progress=not args.quiet,
    )
    print(format_table([result]))
    print(f"metrics written to {out} (predictions in {Path(out).with_name('predictions.npz')})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from genreclf import timeline
    from genreclf.windows import Decoding, find_inputs

    if args.resume and not args.out:
        raise GenreclfError("--resume needs --out: the file whose recorded files to skip")
    step = args.timeline if args.timeline is not None else (timeline.DEFAULT_STEP if args.plot else None)
    if step is not None and "csv" in (args.format, args.out and args.out.suffix.lower().lstrip(".")):
        raise GenreclfError("--timeline and --plot need JSON or table output: CSV rows have no room for a timeline")
    files, errors = find_inputs(args.inputs)
    out = _ResultsFile(args.out, args.resume) if args.out else None
    done = out.recorded if out else set()
    errors = [(source, error) for source, error in errors if os.path.abspath(source) not in done]
    todo = [path for path in files if os.path.abspath(path) not in done]
    if done:
        log.info(
            "%s: %d of %d files already done; tagging the other %d",
            args.out,
            len(files) - len(todo),
            len(files),
            len(todo),
        )
    try:  # the decoders start now and work while torch is imported and the model loaded (a second or more)
        with Decoding(todo, args.workers, step, args.crop) as decoding:
            return _predict_decoded(args, decoding, files, errors, out, step)
    finally:
        if out:
            out.close()


def _predict_decoded(args: argparse.Namespace, decoding: Any, files: list, errors: list, out: Any, step: Any) -> int:
    """`genreclf predict`, its decoders started: load the model, print (and record) each result."""
    from tqdm.auto import tqdm

    from genreclf.predict import Prediction, Tagger
    from genreclf.progress import progress_bar

    tagger = Tagger.load(args.model, crop=args.crop, n_crops=args.crops, consistent=args.consistent)
    _check_decisions(tagger, args)
    plots = _Plots(args.plot, files) if args.plot else None
    if args.format == "csv":
        print(",".join(_CSV_HEADER), flush=True)
    failed = 0

    def emit(prediction: Prediction) -> None:
        nonlocal failed
        record = _record(prediction, args.top)
        if "error" not in record and "warning" not in record:
            record.update(_decision_fields(prediction, args))
        if plots and "error" not in record and "warning" not in record:
            record["plot"] = plots.draw(prediction)
        failed += "error" in record
        if out:
            out.write(record)
        with tqdm.external_write_mode(file=sys.stdout):  # printed above a live progress bar, not through it
            print(_format_record(record, args.format), end="", flush=True)

    bar = progress_bar(len(decoding.files), desc="predict", unit="file", enabled=not args.quiet)
    try:
        for source, error in errors:
            emit(Prediction(source, tagger.genres, [], error=error))
        for prediction in tagger.predict_many(decoding, timeline=step):
            emit(prediction)
            bar.update()
    finally:
        bar.close()
    if failed:
        print(f"genreclf: {failed} input(s) could not be tagged (see the errors above)", file=sys.stderr)
    return 1 if failed else 0


def _check_decisions(tagger: Any, args: argparse.Namespace) -> None:
    """Refuse --with-parents for a model without a genre tree; warn once when no genre can be chosen."""
    if args.threshold is None and tagger.decision.thresholds is None:
        log.warning(
            "%s has no per-genre thresholds, so no genres are chosen: run `genreclf calibrate` on it "
            "once, or give --threshold",
            args.model,
        )
    elif args.with_parents and tagger.decision.parents is None:
        raise GenreclfError(
            f"{args.model} does not store the genre tree that --with-parents needs: run "
            "`genreclf calibrate` on it once to add it"
        )


def _decision_fields(prediction: Any, args: argparse.Namespace) -> dict:
    """Return a record's "chosen" genres: None where the model has no thresholds and no --threshold is given."""
    decision = prediction.decision
    if args.threshold is None and (decision is None or decision.thresholds is None):
        return {"chosen": None}
    return {"chosen": prediction.chosen(args.threshold, args.with_parents)}


def _chosen_mark(record: dict, genre: dict, yes: str, no: str, unknown: str) -> str:
    """Return how a ranked genre of a record is marked: chosen, not chosen, or no decision."""
    if record.get("chosen") is None:
        return unknown
    return yes if genre["genre"] in record["chosen"] else no


def cmd_calibrate(args: argparse.Namespace) -> int:
    from genreclf.calibrate import calibrate, describe

    record = calibrate(
        args.model,
        args.store,
        split=args.split,
        seed=args.seed,
        crop=args.crop,
        n_crops=args.crops,
        min_positives=args.min_positives,
        progress=not args.quiet,
    )
    path = Path(args.model) / "model.safetensors" if Path(args.model).is_dir() else Path(args.model)
    print(f"thresholds written to {path}: {describe(record)}")
    return 0


def _genres_to_write(prediction, args: argparse.Namespace) -> list[str]:
    """Return the genres `genreclf tag` writes for one file's prediction: the one place this is decided.

    The genres the model chooses (its per-genre thresholds, or one --threshold for all), with their
    ancestors under --with-parents; at most --top of them, most probable first.
    """
    return prediction.chosen(args.threshold, args.with_parents)[: args.top]


def _show_genres(genres: list[str], separator: str) -> str:
    return separator.join(genres) if genres else "(no genre)"


def cmd_tag(args: argparse.Namespace) -> int:
    from contextlib import nullcontext
    from dataclasses import replace

    from genreclf import tag

    if args.undo is not None:
        if args.model is not None or args.write or args.undo_log is not None:
            return fatal("--undo LOG takes nothing else: `genreclf tag --undo LOG`")
        return _undo_tags(args)
    if args.model is None or not args.paths:
        return fatal("give a model and audio files or folders (`genreclf tag MODEL PATHS...`), or --undo LOG")

    from genreclf import audio
    from genreclf.predict import Tagger

    tagger = Tagger.load(args.model, crop=args.crop, n_crops=args.crops)
    if args.threshold is None and tagger.decision.thresholds is None:
        return fatal(
            f"{args.model} has no per-genre thresholds: run `genreclf calibrate` on it once, or give --threshold"
        )
    if args.with_parents and tagger.decision.parents is None:
        return fatal(f"{args.model} does not store the genre tree --with-parents needs: run `genreclf calibrate` once")
    files, failed, changed, total = [], 0, 0, 0
    for source in args.paths:
        try:
            found = audio.find_audio_files(source)
        except GenreclfError as e:
            print(f"error: {e}")
            failed += 1
            continue
        if not found:
            print(f"error: {source}: no audio files found in this folder")
            failed += 1
        files += found
    undo_log = tag.UndoLog(args.undo_log) if args.write and args.undo_log is not None else None
    with undo_log or nullcontext():
        for path in files:
            total += 1
            try:
                tag.read_genres(path, args.separator)  # a file that cannot be tagged fails before it is decoded
                wave = audio.load(path)
                if audio.is_silent(wave):
                    log.warning("%s: silent (RMS below %g dBFS); not tagged", path, audio.SILENCE_DBFS)
                    continue
                prediction = replace(tagger.predict(wave), source=str(path))
                change = tag.plan(path, _genres_to_write(prediction, args), args.mode, args.separator)
                if args.write:
                    tag.apply(change, args.separator, undo_log)
            except (GenreclfError, OSError) as e:
                reason = e if isinstance(e, GenreclfError) else f"{path}: {e.strerror or e}"
                print(f"error: {reason}")
                failed += 1
                continue
            old, new = _show_genres(change.old, args.separator), _show_genres(change.new, args.separator)
            if change.changed:
                changed += 1
                print(f"{path}: {old} -> {new}" + ("" if args.write else " (dry run)"))
            else:
                print(f"{path}: {old} (unchanged)")
    if args.write:
        undo = f"; undo with `genreclf tag --undo {args.undo_log}`" if args.undo_log is not None and changed else ""
        print(f"genreclf: tagged {changed} of {total} file(s){undo}", file=sys.stderr)
    else:
        print(
            f"genreclf: dry run, nothing written: {changed} of {total} file(s) would change; add --write to tag them",
            file=sys.stderr,
        )
    if failed:
        print(f"genreclf: {failed} input(s) could not be tagged (see the errors above)", file=sys.stderr)
    return 1 if failed else 0


def _undo_tags(args: argparse.Namespace) -> int:
    from genreclf import tag

    problems = 0
    for result in tag.undo(args.undo, args.separator):
        genres = _show_genres(result.genres, args.separator)
        if result.status == "error":
            print(f"error: {result.message}")
        elif result.status == "changed since":
            print(f"{result.path}: skipped, its genres were changed since the log was written (now {genres})")
        else:
            print(f"{result.path}: {genres} ({result.status})")
        problems += result.status in ("error", "changed since")
    if problems:
        print(f"genreclf: {problems} file(s) were not restored (see above)", file=sys.stderr)
    return 1 if problems else 0


_CSV_HEADER = ("file", "rank", "genre", "probability", "chosen", "error")


def _record(prediction, top: int) -> dict:
    """Return the output record of one file: its top genres (and a warning: silent audio), or its error."""
    file = os.path.abspath(prediction.source)
    if prediction.error:
        return {"file": file, "error": prediction.error}
    record = {"file": file, "genres": [{"genre": g, "probability": round(p, 4)} for g, p in prediction.top(top)]}
    if prediction.warning:
        record["warning"] = prediction.warning
    if prediction.timeline is not None:
        record["timeline"] = prediction.timeline.record(prediction.genres, top)
    return record


class _Plots:
    """`predict --plot DIR`: one PNG per file, FILE_NAME.png; files of the same name add a hash of their path."""

    def __init__(self, folder: Path, files: list[Path]):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GenreclfError(f"--plot {folder}: cannot create the folder ({e.strerror})") from None
        self.folder = folder
        stems = [Path(f).stem for f in files]
        self.shared = {stem for stem in stems if stems.count(stem) > 1}

    def draw(self, prediction) -> str:
        """Draw `prediction`'s timeline; return the PNG's path."""
        from genreclf import timeline

        source = os.path.abspath(prediction.source)
        stem = Path(source).stem
        if stem in self.shared:
            stem += "-" + hashlib.sha1(source.encode()).hexdigest()[:8]
        path = self.folder / f"{stem}.png"
        timeline.plot(prediction.timeline, prediction.genres, prediction.probabilities, path, Path(source).name)
        return str(path)


def _format_record(record: dict, fmt: str) -> str:
    """Return one record as text: a JSON line, CSV rows (the error column holds an error or a warning), or a table."""
    if fmt == "json":
        return json.dumps(record) + "\n"
    if fmt == "csv":
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        for rank, g in enumerate(record.get("genres", []), 1):
            writer.writerow(
                [record["file"], rank, g["genre"], g["probability"], _chosen_mark(record, g, "1", "0", ""), ""]
            )
        if "error" in record or "warning" in record:
            writer.writerow([record["file"], "", "", "", "", record.get("error") or record["warning"]])
        return text.getvalue()
    lines = [record["file"]]
    lines += [f"  {key}: {record[key]}" for key in ("error", "warning") if key in record]
    lines += [
        f"  {g['probability']:6.3f} {_chosen_mark(record, g, '*', ' ', ' ')} {g['genre']}"
        for g in record.get("genres", [])
    ]
    if record.get("chosen") is not None:
        lines.append(f"  chosen: {', '.join(record['chosen']) or '(none)'}")
    for segment in record.get("timeline", {}).get("segments", []):
        minutes, seconds = divmod(segment["start"], 60)
        genres = ", ".join(f"{g['genre']} {g['probability']:.2f}" for g in segment["genres"][:3]) or "(silent)"
        lines.append(f"  {int(minutes):3d}:{seconds:04.1f}  {genres}")
    if "plot" in record:
        lines.append(f"  plot: {record['plot']}")
    return "\n".join(lines) + "\n"


class _ResultsFile:
    """A --out file (.jsonl or .csv) that records are appended to, each in one write: a killed run loses at most one."""

    def __init__(self, path: Path, resume: bool):
        self.fmt = {".jsonl": "json", ".csv": "csv"}.get(path.suffix.lower())
        if self.fmt is None:
            raise GenreclfError(f"--out {path}: give a .jsonl or .csv file")
        exists = path.is_file() and path.stat().st_size > 0
        if exists and not resume:
            raise GenreclfError(f"--out {path} exists; pass --resume to tag only the files not in it, or remove it")
        self.recorded: set[str] = set()
        if exists:
            data = path.read_bytes()
            complete = data[: data.rfind(b"\n") + 1]  # a last line without its newline is from a killed run
            if len(complete) < len(data):
                os.truncate(path, len(complete))
            for line in complete.decode().splitlines():
                if self.fmt == "json":
                    self.recorded.add(json.loads(line)["file"])
                elif line and not line.startswith("file,"):
                    self.recorded.add(next(csv.reader([line]))[0])
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if self.fmt == "csv" and os.fstat(self.fd).st_size == 0:
            self._append(",".join(_CSV_HEADER) + "\n")

    def write(self, record: dict) -> None:
        """Append one record."""
        self._append(_format_record(record, self.fmt))

    def _append(self, text: str) -> None:
        data = text.encode()
        while data:
            data = data[os.write(self.fd, data) :]

    def close(self) -> None:
        """Close the file."""
        os.close(self.fd)


def cmd_report(args: argparse.Namespace) -> int:
    from genreclf.report import build_report

    result = build_report(
        args.runs,
        args.out,
        store=args.store,
        split=args.split,
        n_boot=args.boot,
        pr_genres=args.pr_genre,
        progress=not args.quiet,
        whole_sequence=args.whole_sequence,
        targets=args.targets,
        consistent=args.consistent,
    )
    print(f"report written to {result.markdown} (with {result.json.name} and {len(result.figures)} figures)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from genreclf.compare import compare_models
    from genreclf.compare_report import format_text
    from genreclf.config import FitConfig

    fit = FitConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        min_crop=args.min_crop,
        max_crop=args.max_crop,
        val_crop=args.max_crop,
        workers=args.workers,
        early_stopping=args.early_stopping,
        accelerator=args.accelerator,
        cache=args.cache,
        precision=args.precision,
    )
    optim = _compare_configs(args)
    result = compare_models(
        args.store, args.out, args.models, args.seeds, fit, optim, n_boot=args.n_boot, progress=not args.quiet
    )
    print(format_text(result.summary))
    print(
        f"report written to {result.markdown} (with {result.json.name} and {result.figure.name}); "
        f"{len(result.trained)} run(s) trained this time, all runs in {Path(args.out) / 'runs'}"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from genreclf.demo import run_demo

    run_demo(args.out, tracks=args.tracks, seconds=args.seconds, epochs=args.epochs, progress=not args.quiet)
    if args.pretraining:
        from genreclf.demo_pretrain import run_pretraining_demo

        run_pretraining_demo(args.out, epochs=args.epochs, progress=not args.quiet)
    if args.compare:
        from genreclf.demo_compare import run_compare_demo

        run_compare_demo(args.out, epochs=args.epochs, progress=not args.quiet)
    return 0


# --- parser ---------------------------------------------------------------------------------
# Every default is read from the dataclass field or the function parameter that owns it: the
# command runs with it and --help shows it. Reading one imports its module (train.py imports
# Lightning), so a command's arguments are only added once that command is parsed or asked for help.


def cmd_serve(args: argparse.Namespace) -> int:
    from genreclf.serve import ServeConfig, serve

    api_key = args.api_key or os.environ.get("GENRECLF_API_KEY") or None
    config = ServeConfig(
        host=args.host,
        port=args.port,
        max_upload_mb=args.max_upload_mb,
        workers=args.workers,
        api_key=api_key,
        consistent=args.consistent,
    )
    serve(args.model, config)
    return 0


def _default(owner: Callable[..., Any], name: str) -> Any:
    """Return the default of parameter `name` of a function, or of field `name` of a dataclass."""
    default = inspect.signature(owner).parameters[name].default
    if default is inspect.Parameter.empty:
        raise TypeError(f"{owner.__qualname__}({name}) has no default")
    return default


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except for flags and options whose default is None (the help says why)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


class _CommandParser(argparse.ArgumentParser):
    """A command's parser that adds its arguments (`add_arguments(self)`) the first time it is used."""

    def __init__(
        self, *args: Any, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs: Any
    ):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self._add_arguments = add_arguments

    def _complete(self) -> None:
        if self._add_arguments is not None:
            add, self._add_arguments = self._add_arguments, None
            _add_verbosity(self, argparse.SUPPRESS)  # -q/-v after the command too
            add(self)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self._complete()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._complete()
        return super().format_usage()

    def format_help(self) -> str:
        self._complete()
        return super().format_help()


def _add_verbosity(p: argparse.ArgumentParser, default: bool | str) -> None:
    """Add -q/--quiet and -v/--verbose (a command's default is SUPPRESS: it keeps what the top level parsed)."""
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="no progress bars, warnings only")
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")


def _add_split(p: argparse.ArgumentParser, default: str | None, help_text: str, hint: str) -> None:
    """Add --split; a part name given to it (FMA calls its parts splits) is answered with `hint`."""
    from genreclf.config import SPLITS
    from genreclf.metadata import PARTS  # FMA's own word for training/validation/test

    def split(text: str) -> str:
        if text in PARTS:
            raise argparse.ArgumentTypeError(
                f"{text!r} is a part, not a split ({' or '.join(SPLITS)}); {hint.format(part=text)}"
            )
        return text

    p.add_argument("--split", type=split, choices=SPLITS, default=default, help=help_text)


def _add_synth(p: argparse.ArgumentParser) -> None:
    from genreclf.synth import make_corpus

    p.description = (
        "Write a synthetic corpus in FMA's exact layout and formats: OUT/fma_metadata/tracks.csv, "
        "OUT/fma_metadata/genres.csv and 44.1 kHz stereo MP3s at OUT/fma_large/AAA/AAABBB.mp3. "
        "Each genre has an acoustic signature, so a working pipeline learns it and a broken one does not."
    )
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--tracks", type=_positive_int, default=200, help="number of tracks")
    p.add_argument(
        "--seconds", type=_positive_float, default=_default(make_corpus, "seconds"), help="clip length in seconds"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=_default(make_corpus, "seed"),
        help="random seed; the same seed writes the same corpus",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=_default(make_corpus, "workers"),
        help="encoder processes (default: all cores)",
    )
    p.add_argument(
        "--genres",
        type=_positive_int,
        default=_default(make_corpus, "n_genres"),
        help="genres to use, most frequent first (default: the 27 the demo uses; up to the genres under their 8 roots)",
    )
    p.add_argument(
        "--zipf",
        type=float,
        default=_default(make_corpus, "zipf"),
        help="genre popularity ~ rank ** -ZIPF (1.0 with --genres 99, as `make compare-losses`: the top genre on "
        "~27%% of the tracks, a tail of genres on under 1%%)",
    )
    p.set_defaults(func=cmd_synth)


def _add_data(p: argparse.ArgumentParser) -> None:
    p.description = "Commands that fetch the FMA dataset."
    data_sub = p.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    data_sub.add_parser(
        "download", help="download, verify and unzip FMA's archives (resumable)", add_arguments=_add_download
    )


def _add_download(p: argparse.ArgumentParser) -> None:
    from genreclf.download import SUBSETS, download

    p.description = (
        "Fetch FMA's official archives (fma_metadata.zip, and fma_SUBSET.zip for an audio subset), "
        "resuming partial downloads, checking the SHA-1 checksums FMA publishes, and unzipping them into TO "
        "(the layout `genreclf featurize --data TO` reads). Sizes: metadata 342 MiB, small 7.2 GiB, "
        "medium 22 GiB, large 93 GiB, full 879 GiB."
    )
    p.add_argument(
        "--subset", choices=SUBSETS, required=True, help="what to fetch; an audio subset also fetches the metadata"
    )
    p.add_argument("--to", type=Path, required=True, help="folder for the archives and the unzipped data")
    p.add_argument("--url", default=_default(download, "base_url"), help="base URL of the archives")
    p.add_argument("--delete-archives", action="store_true", help="delete each archive once it is unzipped")
    p.set_defaults(func=cmd_download)


def _add_featurize(p: argparse.ArgumentParser) -> None:
    from genreclf.featurize import featurize

    p.description = (
        "Decode every track of an FMA-layout corpus (DATA/fma_metadata + DATA/fma_large/AAA/AAABBB.mp3), "
        "compute 128-band log-mel spectrograms (30 s, 938 frames) and write them to a memory-mapped float16 store. "
        "Undecodable files are listed in STORE/part-*/failed.csv and the job goes on; an interrupted run resumes "
        "when the same command is run again."
    )
    p.add_argument("--data", type=Path, required=True, help="corpus folder holding fma_metadata/ and the audio")
    p.add_argument("--out", type=Path, required=True, help="store folder to write (or to resume)")
    p.add_argument(
        "--subset",
        choices=["small", "medium", "large", "full"],
        default=_default(featurize, "subset"),
        help="FMA subset to featurize (default: every track in tracks.csv)",
    )
    p.add_argument(
        "--labels",
        choices=["genres", "genres_all"],
        default=_default(featurize, "labels"),
        help="targets from the track's own genres (reference recipe) or with their ancestors",
    )
    p.add_argument(
        "--audio",
        type=Path,
        default=_default(featurize, "audio_dir"),
        help="audio folder (default: DATA/fma_large, else fma_medium, fma_small, fma_full)",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=_default(featurize, "workers"),
        help="decoder processes (default: all cores)",
    )
    p.add_argument(
        "--shard",
        type=_shard,
        default=_default(featurize, "shard"),
        metavar="K/N",
        help="featurize part K of N (0-based) into its own part of the store; under torchrun or "
        "SLURM the default is RANK/WORLD_SIZE",
    )
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="try the tracks listed in failed.csv again (after fixing or restoring their files)",
    )
    p.add_argument(
        "--device",
        default=_default(featurize, "device"),
        help="batch the log-mel on this torch device (default: cuda if present, else one clip per CPU worker)",
    )
    p.add_argument(
        "--min-seconds",
        type=_positive_float,
        default=_default(featurize, "min_seconds"),
        help="clips shorter than this are recorded as failed",
    )
    p.add_argument(
        "--clip-timeout",
        type=_positive_float,
        default=_default(featurize, "clip_timeout"),
        metavar="SECONDS",
        help="a clip whose decoder gives no result in this time is recorded as failed",
    )
    p.set_defaults(func=cmd_featurize)


def _add_loss(p: argparse.ArgumentParser) -> None:
    """Add --loss and the parameters of each loss (train, compare)."""
    from genreclf.config import LOSSES, TrainConfig

    p.add_argument(
        "--loss",
        choices=LOSSES,
        default=_default(TrainConfig, "loss"),
        help="with p = sigmoid(logit) and y the 0/1 label, per (clip, genre): bce: -(w y log p + (1 - y) "
        "log(1 - p)), w the positive weight; focal (Lin et al. 2017): -alpha_t (1 - p_t)^gamma log p_t, "
        "p_t and alpha_t being p and alpha on a positive label, 1 - p and 1 - alpha on a negative; asymmetric "
        "(ASL, Ridnik et al. 2021): -(1 - p)^gamma_pos log p on positives, -p_m^gamma_neg log(1 - p_m) on "
        "negatives, p_m = max(p - clip, 0); each summed over the genres, averaged over the clips. lsep (Li et al. "
        "2017): log(1 + sum over (negative v, positive u) of exp(logit_v - logit_u)) per clip, averaged over the "
        "clips (a clip without a positive or a negative: 0)",
    )
    p.add_argument(
        "--pos-weight",
        type=_positive_float,
        default=_default(TrainConfig, "pos_weight"),
        help="bce: weight of positive labels, as in the reference",
    )
    p.add_argument(
        "--focal-gamma",
        type=float,
        default=_default(TrainConfig, "focal_gamma"),
        help="focal: exponent gamma >= 0 of (1 - p_t) (0, with alpha none: plain BCE)",
    )
    p.add_argument(
        "--focal-alpha",
        type=_number_or_none,
        default=_default(TrainConfig, "focal_alpha"),
        help="focal: weight alpha in (0, 1) of positive labels, 1 - alpha of negatives (as Lin et al.); "
        "none: 1 for both",
    )
    p.add_argument(
        "--asl-gamma-pos",
        type=float,
        default=_default(TrainConfig, "asl_gamma_pos"),
        help="asymmetric: exponent >= 0 of (1 - p) on positive labels",
    )
    p.add_argument(
        "--asl-gamma-neg",
        type=float,
        default=_default(TrainConfig, "asl_gamma_neg"),
        help="asymmetric: exponent >= 0 of p_m on negative labels",
    )
    p.add_argument(
        "--asl-clip",
        type=float,
        default=_default(TrainConfig, "asl_clip"),
        help="asymmetric: probability margin in [0, 1) taken off negatives (p_m = max(p - clip, 0))",
    )


def _add_train(p: argparse.ArgumentParser) -> None:
    from genreclf.config import FitConfig, TrainConfig

    p.description = (
        "Train on the store's training split with random 128-256-frame crops and a loss (--loss: by default "
        "the reference's positively weighted binary cross-entropy); the epoch with the lowest validation loss "
        "becomes OUT/model.safetensors, which records the loss. Progress, losses per epoch (OUT/logs/metrics.csv) "
        "and an ETA are shown; an interrupted run continues with --resume (with the same loss). A parameter of "
        "another loss than --loss is refused. val_loss is on the scale of the loss chosen: compare runs of "
        "different losses with `genreclf evaluate`, not by val_loss."
    )
    p.add_argument("--model", choices=["gru", "transformer"], required=True, help="architecture")
    p.add_argument(
        "--lr",
        type=_positive_float,
        default=_default(TrainConfig, "lr"),
        help="Adam learning rate, as in the reference",
    )
    _add_loss(p)
    p.add_argument("--weight-decay", type=float, default=_default(TrainConfig, "weight_decay"), help="Adam L2 penalty")
    p.add_argument(
        "--pretrained",
        default=_default(FitConfig, "pretrained"),
        metavar="ENCODER",
        help="start the transformer from encoder.safetensors of `genreclf pretrain`",
    )
    _add_fit(p, TrainConfig)
    p.set_defaults(func=cmd_train)


def _add_pretrain(p: argparse.ArgumentParser) -> None:
    from genreclf.config import MASKINGS, PretrainConfig

    p.description = (
        "Self-supervised pretraining: random frames are masked and the Transformer "
        "encoder learns to reconstruct them (no labels used). Writes OUT/encoder.safetensors for "
        "`genreclf train --model transformer --pretrained`."
    )
    p.add_argument(
        "--masking",
        choices=MASKINGS,
        default=_default(PretrainConfig, "masking"),
        help="span: spans of 8 frames (~--mask-ratio of them) replaced by a learned vector; reference: the "
        "reference's random_mask (~18%% of frames in runs of 2.2, set to 0), input masked and target clean",
    )
    p.add_argument("--lr", type=_positive_float, default=_default(PretrainConfig, "lr"), help="Adam learning rate")
    p.add_argument(
        "--mask-ratio",
        type=float,
        default=_default(PretrainConfig, "mask_ratio"),
        help="span masking: fraction of frames masked",
    )
    _add_fit(p, PretrainConfig)
    p.set_defaults(func=cmd_pretrain)


def _add_schedule(p: argparse.ArgumentParser, optimiser: type) -> None:
    """Add the training options every training command has (train, pretrain, compare): epochs, batches, crops,
    stopping, the plateau patience of `optimiser`, loader workers, the cache, the accelerator and its precision."""
    from genreclf.config import CACHES, PRECISIONS, FitConfig

    p.add_argument("--epochs", type=_positive_int, default=_default(FitConfig, "epochs"), help="maximum epochs")
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=_default(FitConfig, "batch_size"),
        help="tracks per batch, in all: under DDP each of the processes takes an equal share (a divisor)",
    )
    p.add_argument(
        "--min-crop", type=_positive_int, default=_default(FitConfig, "min_crop"), help="shortest random crop, frames"
    )
    p.add_argument(
        "--max-crop",
        type=_positive_int,
        default=_default(FitConfig, "max_crop"),
        help="longest random crop, frames (also the validation crop)",
    )
    p.add_argument(
        "--early-stopping",
        type=_count,
        default=_default(FitConfig, "early_stopping"),
        metavar="EPOCHS",
        help="stop after this many epochs without a better validation loss (0: never)",
    )
    p.add_argument(
        "--plateau-patience",
        type=_positive_int,
        default=_default(optimiser, "plateau_patience"),
        help="epochs without improvement before the learning rate is divided by 10",
    )
    p.add_argument(
        "--workers",
        type=_count,
        default=_default(FitConfig, "workers"),
        help="data loader processes (default: 0 on the CPU, where they slow training down; 1 on a GPU)",
    )
    p.add_argument(
        "--cache",
        choices=CACHES,
        default=_default(FitConfig, "cache"),
        help="where batches are read from: none, the store memory-mapped (pages cached by the OS); ram, the "
        "features read into memory once (refused if they do not fit; forked --workers share them); gpu, the "
        "float16 features held on the training GPU, crops cut there (only indices cross to the GPU; "
        "--workers unused). fma_large: 25.6 GB. Every choice gives the same batches",
    )
    p.add_argument(
        "--accelerator", default=_default(FitConfig, "accelerator"), help="Lightning accelerator: auto, cpu, gpu"
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=_default(FitConfig, "precision"),
        help="Lightning precision: 32, or bf16-mixed (bfloat16 autocast, float32 weights); auto is bf16-mixed "
        "on a CUDA GPU with native bfloat16 (Ampere and later) and 32 elsewhere, the CPU included",
    )


def _add_fit(p: argparse.ArgumentParser, optimiser: type) -> None:
    """Add the arguments train and pretrain share: FitConfig's, and the plateau patience of `optimiser`."""
    from genreclf.config import SPLITS, FitConfig

    p.add_argument("--store", type=Path, required=True, help="feature store from `genreclf featurize`")
    p.add_argument("--out", type=Path, required=True, help="run folder to write")
    _add_schedule(p, optimiser)
    p.add_argument(
        "--split",
        choices=SPLITS,
        default=_default(FitConfig, "split"),
        help="FMA's artist-filtered split (official) or a random split like the reference's "
        "80/20: 20%% test, 8%% validation, 72%% training",
    )
    p.add_argument(
        "--seed", type=int, default=_default(FitConfig, "seed"), help="random seed (weights, crops, reference split)"
    )
    p.add_argument(
        "--devices",
        default=_default(FitConfig, "devices"),
        help="Lightning devices per machine: auto, or a number of GPUs/processes (e.g. 4 for DDP)",
    )
    p.add_argument(
        "--num-nodes",
        type=_positive_int,
        default=_default(FitConfig, "num_nodes"),
        help="machines (DDP, launched by torchrun or SLURM srun); --batch-size is shared by devices x nodes processes",
    )
    p.add_argument(
        "--strategy",
        default=_default(FitConfig, "strategy"),
        help="Lightning strategy: auto, or ddp (one process per device, launched by torchrun or srun; gloo on CPU)",
    )
    p.add_argument("--resume", action="store_true", help="continue OUT from its last checkpoint")
    p.add_argument(
        "--set-lr",
        type=_positive_float,
        metavar="LR",
        help="with --resume: the learning rate from the next epoch on (e.g. lower, after a divergence)",
    )


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    from genreclf.evaluate import evaluate
    from genreclf.metadata import PARTS

    p.description = (
        "Predict every track of a split (mean over evenly spaced crops, and with --whole-sequence over the whole "
        "sequence too) and compute the reference's positively weighted AP, micro AP, macro AP and macro ROC-AUC, "
        "each with the score of a prior-only predictor, on all genres and on each level of the genre tree (level 1: "
        "the 16 top-level genres), plus FMA's top-level genre accuracy. Writes metrics.json and predictions.npz."
    )
    p.add_argument("model", help="model.safetensors (or the run folder holding it)")
    p.add_argument("--store", type=Path, required=True, help="feature store to evaluate on")
    _add_split(
        p,
        _default(evaluate, "split"),
        help_text="which split (default: the one the model was trained on)",
        hint="for the {part} part use --part {part}",
    )
    p.add_argument("--part", choices=PARTS, default=_default(evaluate, "part"), help="which part of the split")
    p.add_argument("--crop", type=_positive_int, default=_default(evaluate, "crop"), help="crop length in frames")
    p.add_argument(
        "--crops", type=_positive_int, default=_default(evaluate, "n_crops"), help="evenly spaced crops per track"
    )
    p.add_argument(
        "--whole-sequence",
        action="store_true",
        help="also score each whole sequence at once (metrics_whole_sequence in metrics.json)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=_default(evaluate, "seed"),
        help="seed of the reference split (default: the model's training seed)",
    )
    _add_hierarchy(p, _default(evaluate, "targets"), _default(evaluate, "consistent"))
    p.add_argument("--out", type=Path, default=None, help="metrics file (default: beside the model)")
    p.set_defaults(func=cmd_evaluate)


def _add_hierarchy(p: argparse.ArgumentParser, targets: str | None, consistent: bool | None) -> None:
    """Add --targets and --consistent (evaluate; report, where their defaults None keep each run's evaluation)."""
    from genreclf.metadata import LABEL_COLUMNS

    runs = " (default: as each run was evaluated)" if consistent is None else ""
    p.add_argument(
        "--targets",
        choices=LABEL_COLUMNS,
        default=targets,
        help="score against these labels whatever the model was trained on"
        + (runs or " (default: the store's own)")
        + ". From a genres store, genres_all is derived exactly (genres and their ancestors); from a genres_all "
        "store, genres as each track's most specific genres (FMA's genres also lists an ancestor a track was "
        "tagged with)",
    )
    p.add_argument(
        "--consistent",
        action="store_true" if consistent is not None else argparse.BooleanOptionalAction,
        default=consistent,
        help="make the scores hierarchy-consistent first: each genre raised to its most probable descendant's "
        "score, so no genre scores above its parent" + runs,
    )


def _add_predict(p: argparse.ArgumentParser) -> None:
    # No torch here: `genreclf predict` starts its decoders before it imports torch.
    from genreclf.crops import CROP_FRAMES, N_CROPS
    from genreclf.result import Prediction
    from genreclf.windows import Decoding

    p.description = (
        "Tag audio files or folders (walked for audio) of any length: each file is cut into 30-s "
        "windows, each window scored over evenly spaced crops, and the audible windows averaged; silent audio "
        "gets no genres and a warning. Files are decoded in worker processes and each result is printed (and "
        "appended to --out) as soon as it is done, in the order files finish. One record per file: "
        'JSON Lines {"file", "genres": [{"genre", "probability"}, ...], "chosen", "warning"?, "timeline"?, '
        '"plot"?} or {"file", "error"}; CSV rows file,rank,genre,probability,chosen,error. --timeline adds '
        '{"step", "segments": [{"start", "end", "genres"}, ...]} (silent segments: no genres); --plot draws it. '
        "A file that cannot be read gets an error record; the others are still tagged, and the exit code is 1."
    )
    p.add_argument("model", help="model.safetensors (or the run folder holding it)")
    p.add_argument("inputs", nargs="+", type=Path, metavar="FILE_OR_DIR", help="audio files or folders")
    p.add_argument("--top", type=_positive_int, default=_default(Prediction.top, "k"), help="genres to show per file")
    p.add_argument(
        "--format",
        choices=["table", "json", "csv"],
        default="table",
        help="stdout format; json is JSON Lines (one object per file, as it is done)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="also append each record to this .jsonl or .csv file as it is done (one write per record)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="with --out: skip the files already recorded there (by absolute path), e.g. after a killed run",
    )
    p.add_argument(
        "--workers",
        type=_count,
        default=_default(Decoding, "workers"),
        help="decoder processes (default: one per core but one, which scores; 0: decode in this process)",
    )
    p.add_argument("--crop", type=_positive_int, default=CROP_FRAMES, help="crop length in frames")
    p.add_argument("--crops", type=_positive_int, default=N_CROPS, help="crops per 30-s window")
    p.add_argument(
        "--threshold",
        type=_probability,
        default=_default(Prediction.chosen, "threshold"),
        help="choose the genres with a probability >= this (default: the model's per-genre thresholds)",
    )
    p.add_argument(
        "--with-parents",
        action="store_true",
        help="add the ancestors of each chosen genre from genres.csv (Metal brings Rock)",
    )
    p.add_argument(
        "--consistent",
        action="store_true",
        help="hierarchy-consistent probabilities: each genre raised to its most probable descendant's, so no "
        "genre is more probable than its parent (the timeline's too)",
    )
    p.add_argument(
        "--timeline",
        type=_step_seconds,
        metavar="SECONDS",
        help="also the top genres every SECONDS (e.g. 10), per segment, in each record (JSON or table)",
    )
    p.add_argument(
        "--plot",
        type=Path,
        metavar="DIR",
        help="write one PNG per file into DIR: the track's top genres over time (--timeline, default 10 s)",
    )
    p.set_defaults(func=cmd_predict)


def _add_calibrate(p: argparse.ArgumentParser) -> None:
    from genreclf.calibrate import calibrate

    p.description = (
        "Choose a model's per-genre decision thresholds on the validation split of a store and write them into "
        "its model file (weights and other metadata kept), as `genreclf train` does when a run ends: for models "
        "trained before thresholds existed, or to choose them again. Each genre's threshold maximises its F1 on "
        "the validation tracks; a genre with fewer than --min-positives validation positives takes the threshold "
        "maximising F1 over all (track, genre) pairs."
    )
    p.add_argument("model", help="model.safetensors (or the run folder holding it)")
    p.add_argument("--store", type=Path, required=True, help="feature store whose validation split to use")
    _add_split(
        p,
        _default(calibrate, "split"),
        help_text="which split's validation part (default: the one the model was trained on)",
        hint="thresholds are always chosen on the validation part",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=_default(calibrate, "seed"),
        help="seed of the reference split (default: the model's training seed)",
    )
    p.add_argument("--crop", type=_positive_int, default=_default(calibrate, "crop"), help="crop length in frames")
    p.add_argument(
        "--crops", type=_positive_int, default=_default(calibrate, "n_crops"), help="evenly spaced crops per track"
    )
    p.add_argument(
        "--min-positives",
        type=_positive_int,
        default=_default(calibrate, "min_positives"),
        help="genres with fewer validation positives take the global threshold",
    )
    p.set_defaults(func=cmd_calibrate)


def _add_tag(p: argparse.ArgumentParser) -> None:
    from genreclf import tag
    from genreclf.predict import Tagger

    p.usage = "genreclf tag MODEL PATHS... [--write] [--mode MODE] [options]\n       genreclf tag --undo LOG"
    p.description = (
        "Write predicted genres into the audio files' own tags: ID3v2.4 TCON for MP3 (one value per genre), "
        "GENRE Vorbis comments for FLAC, Ogg Vorbis and Opus (one per genre), and one ©gen value for M4A with the "
        "genres joined by --separator (players read only the first of several). A dry run by default: each file's "
        "old and new genres are printed and nothing is written; --write writes them. Only the tags change, never "
        "the audio; each file is rewritten through a copy renamed over it (a crash leaves the old file or the new "
        "one) and keeps its permissions and times. The genres written are those the model chooses with its "
        "per-genre thresholds (or one --threshold for all), at most --top. "
        "Silent files are skipped with a warning; a file that cannot be tagged (unreadable, not audio, WAV and "
        "other formats without a genre tag) gets an error line, the others are still tagged, and the exit status "
        "is 1. `--undo LOG` puts back the genres an --undo-log recorded, except on files whose genres were changed "
        "since (those are skipped, listed, and make the exit status 1)."
    )
    p.add_argument("model", nargs="?", help="model.safetensors (or the run folder holding it)")
    p.add_argument("paths", nargs="*", type=Path, metavar="PATHS", help="audio files or folders (walked for audio)")
    p.add_argument("--write", action="store_true", help="write the tags (default: a dry run that changes nothing)")
    p.add_argument(
        "--mode",
        choices=tag.MODES,
        default="fill",
        help="fill: only files without a genre; replace: overwrite their genres; append: add the missing ones",
    )
    p.add_argument("--separator", default=tag.SEPARATOR, help="joins genres in M4A's single genre value")
    p.add_argument("--top", type=_positive_int, default=3, help="at most this many genres per file")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="one threshold for every genre instead of the model's per-genre ones (needed for a model "
        "without thresholds: see `genreclf calibrate`)",
    )
    p.add_argument("--with-parents", action="store_true", help="also write each chosen genre's ancestors")
    p.add_argument(
        "--undo-log",
        type=Path,
        default=None,
        metavar="LOG",
        help="with --write, append each file's old and new genres to this JSON Lines file before changing it",
    )
    p.add_argument(
        "--undo", type=Path, default=None, metavar="LOG", help="restore the genres recorded in LOG, newest first"
    )
    p.add_argument("--crop", type=_positive_int, default=_default(Tagger, "crop"), help="crop length in frames")
    p.add_argument("--crops", type=_positive_int, default=_default(Tagger, "n_crops"), help="crops per 30-s window")
    p.set_defaults(func=cmd_tag)


def _add_report(p: argparse.ArgumentParser) -> None:
    from genreclf.report import build_report

    p.description = (
        "Write OUT/report.md, report.json and PNG figures for one or more runs: each metric with its "
        "chance level and a 95% bootstrap interval over tracks, paired bootstrap differences between runs "
        "evaluated on the same tracks, top-level genre accuracy, per-genre AP and ROC-AUC, precision-recall "
        "curves, learning curves, and (with --whole-sequence) whole-sequence vs crop averaging. Runs are evaluated "
        "first where needed."
    )
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders from `genreclf train`")
    p.add_argument("--out", type=Path, required=True, help="folder for the report")
    p.add_argument(
        "--store",
        type=Path,
        default=_default(build_report, "store"),
        help="store to evaluate on (default: each run's own)",
    )
    _add_split(
        p,
        _default(build_report, "split"),
        help_text="split to evaluate on (default: the one each run was trained on)",
        hint="the report always scores the test part",
    )
    p.add_argument("--boot", type=_positive_int, default=_default(build_report, "n_boot"), help="bootstrap resamples")
    p.add_argument(
        "--pr-genre",
        action="append",
        default=_default(build_report, "pr_genres"),
        metavar="GENRE",
        help="genre for the precision-recall plot (repeatable; default: 3 most frequent + Hip-Hop)",
    )
    p.add_argument(
        "--whole-sequence",
        action="store_true",
        help="also compare crop averaging with scoring each whole sequence at once (slower)",
    )
    _add_hierarchy(p, _default(build_report, "targets"), _default(build_report, "consistent"))
    p.set_defaults(func=cmd_report)


def _add_compare(p: argparse.ArgumentParser) -> None:
    from genreclf.compare import compare_models
    from genreclf.config import LOSSES, TrainConfig
    from genreclf.train import MODELS

    p.description = (
        "Train seeds 0 .. SEEDS-1 of every model as ordinary run folders (OUT/runs/MODEL-seedK), evaluate all on "
        "the same test tracks of the official split, and write OUT/compare.md, compare.json and compare.png: per "
        "model the mean and standard deviation over seeds with a 95% interval that covers both the seeds and the "
        "test tracks, each seed's value with its track-only interval, and for each pair of models the difference "
        "with such an interval and a verdict. Run again, it continues where it stopped: finished runs are not "
        "retrained, an unfinished one resumes from its last checkpoint."
    )
    p.add_argument("--store", type=Path, required=True, help="feature store from `genreclf featurize`")
    p.add_argument("--out", type=Path, required=True, help="folder for the runs and the report (or to continue)")
    p.add_argument(
        "--models",
        nargs="+",
        choices=list(MODELS),
        default=list(_default(compare_models, "models")),
        help="models to compare",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=_default(compare_models, "seeds"),
        help="training seeds per model (at least 2: a standard deviation needs two)",
    )
    p.add_argument(
        "--n-boot",
        type=_int_at_least(2),
        default=_default(compare_models, "n_boot"),
        help="bootstrap resamples of the test tracks",
    )
    p.add_argument("--lr", type=_positive_float, default=_default(TrainConfig, "lr"), help="Adam learning rate")
    _add_loss(p)
    p.add_argument(
        "--losses",
        nargs="+",
        choices=LOSSES,
        default=None,
        help="compare these losses too: every (model, loss), named MODEL-LOSS (runs MODEL-LOSS-seedK), each loss "
        "with its own parameters from --pos-weight, --focal-gamma and the like (instead of --loss)",
    )
    p.add_argument("--weight-decay", type=float, default=_default(TrainConfig, "weight_decay"), help="Adam L2 penalty")
    _add_schedule(p, TrainConfig)
    p.set_defaults(func=cmd_compare)


def _add_demo(p: argparse.ArgumentParser) -> None:
    from genreclf.demo import run_demo

    p.description = (
        "Generate a small synthetic FMA-layout corpus, featurize it, train the GRU and the Transformer, "
        "evaluate both on the test split, print a side-by-side table and the top-5 genres of a few files."
    )
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for everything")
    p.add_argument("--tracks", type=_positive_int, default=_default(run_demo, "tracks"), help="tracks to generate")
    p.add_argument(
        "--seconds", type=_positive_float, default=_default(run_demo, "seconds"), help="clip length in seconds"
    )
    p.add_argument(
        "--epochs", type=_positive_int, default=_default(run_demo, "epochs"), help="training epochs per model"
    )
    p.add_argument(
        "--pretraining",
        action="store_true",
        help="then pretrain the Transformer's encoder with each masking (span, reference), fine-tune from each and "
        "compare with the Transformer from scratch on the test split",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="then train 3 seeds of each model and compare them over seeds and test tracks (`genreclf compare`)",
    )
    p.set_defaults(func=cmd_demo)


def _add_serve(p: argparse.ArgumentParser) -> None:
    from genreclf.serve import ServeConfig

    p.description = (
        "Serve a model over HTTP (FastAPI + uvicorn): POST /v1/predict with an audio file in the multipart field "
        "`file` answers its top genres, every genre's probability, the chosen genres and a 10-s timeline as JSON; "
        "GET /v1/genres, /v1/model, /healthz; API docs at /docs; a page to try it at /. The model is loaded once, "
        "uploads are decoded in worker processes and their windows scored together. Needs the serve extra: "
        'pip install "genreclf[serve]".'
    )
    p.add_argument("model", help="model.safetensors (or the run folder holding it)")
    p.add_argument(
        "--host", default=_default(ServeConfig, "host"), help="address to listen on (0.0.0.0: every interface)"
    )
    p.add_argument("--port", type=_positive_int, default=_default(ServeConfig, "port"), help="TCP port")
    p.add_argument(
        "--max-upload-mb",
        type=_positive_float,
        default=_default(ServeConfig, "max_upload_mb"),
        help="larger uploads get 413 (MB of 10^6 bytes)",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=_default(ServeConfig, "workers"),
        help="decoder processes (default: one per core)",
    )
    p.add_argument(
        "--api-key",
        default=_default(ServeConfig, "api_key"),
        help="require this key (X-API-Key header or Authorization: Bearer) on /v1/*; default: $GENRECLF_API_KEY, "
        "else none",
    )
    p.add_argument(
        "--consistent",
        action="store_true",
        help="answer hierarchy-consistent probabilities (no genre more probable than its parent), as predict "
        "--consistent",
    )
    p.set_defaults(func=cmd_serve)


COMMANDS: tuple[tuple[str, str, Callable[[argparse.ArgumentParser], None]], ...] = (
    ("synth", "write a synthetic FMA-layout corpus (MP3 + tracks.csv + genres.csv)", _add_synth),
    ("data", "get FMA: `genreclf data download`", _add_data),
    ("featurize", "turn an FMA-layout corpus into a feature store", _add_featurize),
    ("train", "train a GRU or Transformer tagger on a feature store", _add_train),
    ("pretrain", "masked-frame pretraining of the Transformer encoder", _add_pretrain),
    ("evaluate", "score a trained model on a split of a store", _add_evaluate),
    ("calibrate", "choose a model's per-genre decision thresholds on the validation split", _add_calibrate),
    ("predict", "print the top genres of audio files and the genres chosen", _add_predict),
    ("tag", "write chosen genres into the files' own tags (dry run unless --write)", _add_tag),
    ("report", "compare trained runs: metrics with confidence intervals, figures", _add_report),
    ("compare", "train several seeds of each model and compare them over seeds and test tracks", _add_compare),
    ("demo", "the whole pipeline on a generated corpus, in a few minutes", _add_demo),
    ("serve", "an HTTP API and web page that tag uploaded audio", _add_serve),
)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the `genreclf` command."""
    parser = argparse.ArgumentParser(
        prog="genreclf",
        description="Multi-label music genre classification on the Free Music Archive (FMA): "
        "featurize audio to log-mel spectrograms, train GRU and Transformer taggers, evaluate, predict.",
    )
    parser.add_argument("--version", action="version", version=f"genreclf {__version__}")
    _add_verbosity(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_CommandParser)
    for name, summary, add_arguments in COMMANDS:
        sub.add_parser(name, help=summary, add_arguments=add_arguments)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    return _run(build_parser().parse_args(argv))


def run() -> NoReturn:
    """The `genreclf` command (and `python -m genreclf`): main(), then exit with its code.

    After `predict`, a command people run often and wait for, the exit skips the interpreter's teardown of
    torch's modules (0.3-0.4 s of every run, measured), once the atexit cleanups have run and stdout and
    stderr are flushed, and only when no child process or other thread is left.
    """
    args = build_parser().parse_args()
    code = _run(args)
    if args.command == "predict":
        _quick_exit(code)
    sys.exit(code)


def _quick_exit(code: int) -> None:
    """Exit now without the interpreter's teardown, if nothing is left running; else return."""
    import atexit
    import multiprocessing
    import threading

    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if multiprocessing.active_children() or any(t.is_alive() for t in others):
        return
    atexit._run_exitfuncs()  # what asked to be done at exit is done (logging's flush, temporary folders, ...)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`| head`): nothing left to say
            stream.flush()
    os._exit(code)


def _run(args: argparse.Namespace) -> int:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="genreclf: %(message)s")
    try:
        return args.func(args)
    except GenreclfError as e:
        return fatal(str(e))
    except KeyboardInterrupt:
        return fatal("interrupted; run the same command again to resume where it stopped", 130)
    except BrokenPipeError:  # whoever read our stdout has stopped (`| head`): nothing more to say, no error
        with contextlib.suppress(OSError):  # and no second one when Python flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command stopped by a closed pipe
    except OSError as e:  # a folder that cannot be written, a full disk, ...
        return fatal(f"{e.filename or ''}: {e.strerror or e}; check the path and its permissions and free space")


if __name__ == "__main__":
    run()
