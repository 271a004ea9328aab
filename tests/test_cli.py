"""End to end through the command line: synth -> featurize -> train -> evaluate -> predict."""

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_bad_files

import genreclf
from genreclf.cli import main
from genreclf.modelfile import ModelFile
from genreclf.models import count_parameters
from genreclf.predict import Tagger
from genreclf.store import FeatureStore

TRAIN = ["--epochs", "1", "--batch-size", "8", "--lr", "1e-3", "--workers", "0"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Run the whole pipeline once through the CLI; return its folder."""
    root = tmp_path_factory.mktemp("e2e")
    assert main(["-q", "synth", str(root / "corpus"), "--tracks", "24", "--seconds", "3", "--seed", "1"]) == 0
    assert (
        main(["-q", "featurize", "--data", str(root / "corpus"), "--out", str(root / "store"), "--workers", "2"]) == 0
    )
    for model in ("gru", "transformer"):
        assert (
            main(["-q", "train", "--model", model, "--store", str(root / "store"), "--out", str(root / model), *TRAIN])
            == 0
        )
    return root


def test_synth_and_featurize_outputs(pipeline):
    corpus = pipeline / "corpus"
    tracks = pd.read_csv(corpus / "fma_metadata" / "tracks.csv", index_col=0, header=[0, 1])
    assert len(tracks) == 24 and len(list((corpus / "fma_large").rglob("*.mp3"))) == 24
    store = FeatureStore.open(pipeline / "store")
    assert len(store) == 24 and store.item(0).shape == (938, 128)


@pytest.mark.parametrize("model,params", [("gru", 768_595), ("transformer", 720_467)])
def test_train_writes_a_self_describing_model(pipeline, model, params):
    run = pipeline / model
    for name in ("model.safetensors", "train.json", "logs/metrics.csv", "checkpoints/last.ckpt"):
        assert (run / name).exists(), name
    mf = ModelFile.load(run / "model.safetensors")
    assert mf.config.kind == model and count_parameters(mf.model) == params
    assert len(mf.genres) == 163 and mf.provenance["split"] == "official"
    # What the numbers depend on: genreclf's version, torch's, and the CPU kernels torch chose.
    assert mf.provenance["genreclf"] == genreclf.__version__
    assert mf.provenance["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert mf.provenance["fit"]["precision"] == "auto" and mf.provenance["precision"] == "32-true"  # as it ran
    info = json.loads((run / "train.json").read_text())
    assert info["parameters"] == params and info["epochs"] == 1
    # Round trip: saving what was loaded gives the same predictions.
    copy = mf.save(pipeline / f"{model}_copy.safetensors")
    x = torch.randn(2, 200, 128)
    with torch.no_grad():
        np.testing.assert_array_equal(mf.model(x).numpy(), ModelFile.load(copy).model(x).numpy())


def test_evaluate_writes_metrics(pipeline, capsys):
    assert main(["-q", "evaluate", str(pipeline / "gru"), "--store", str(pipeline / "store"), "--crops", "3"]) == 0
    table = capsys.readouterr().out
    assert "ap_weighted" in table and "chance" in table
    metrics = json.loads((pipeline / "gru" / "metrics.json").read_text())
    n_test = int((FeatureStore.open(pipeline / "store").split == "test").sum())
    assert metrics["n_tracks"] == n_test and metrics["crops"] == {"length": 256, "count": 3}
    for key in ("ap_weighted", "ap_micro", "ap_macro", "roc_auc_macro"):
        assert 0.0 <= metrics["metrics"][key] <= 1.0
        assert 0.0 <= metrics["metrics"]["chance_" + key] <= 1.0
    preds = np.load(pipeline / "gru" / "predictions.npz")
    assert preds["scores"].shape == (n_test, 163) and preds["y_true"].shape == (n_test, 163)


def test_predict_json_with_a_bad_file(pipeline, real_mp3, tmp_path, capsys):
    bad = write_bad_files(tmp_path)["random"]
    code = main(["predict", str(pipeline / "transformer"), str(real_mp3), str(bad), "--format", "json", "--top", "3"])
    assert code == 1  # something failed, the rest was still tagged
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # JSON Lines: one per file
    records.sort(key=lambda r: r["file"] != str(real_mp3))  # in the order they finished
    assert [r["file"] for r in records] == [str(real_mp3), str(bad)]
    top = records[0]["genres"]
    assert len(top) == 3 and top[0]["probability"] >= top[1]["probability"] >= top[2]["probability"]
    assert "error" in records[1] and "not a readable audio file" in records[1]["error"]


def test_predict_any_length(pipeline):
    tagger = Tagger.load(pipeline / "gru")
    for seconds in (2, 75):  # shorter than a crop; several 30-s windows
        wave = np.random.default_rng(seconds).standard_normal(seconds * 16000).astype(np.float32) * 0.1
        pred = tagger.predict(wave)
        assert pred.probabilities.shape == (163,) and np.all((pred.probabilities > 0) & (pred.probabilities < 1))
    # A folder is walked for audio files.
    folder_preds = [tagger.predict(p) for p in sorted((pipeline / "corpus" / "fma_large").rglob("*.mp3"))[:2]]
    assert all(len(p.top(5)) == 5 for p in folder_preds)


def test_bad_model_files_and_arguments(pipeline, tmp_path, capsys):
    not_model = tmp_path / "model.safetensors"
    not_model.write_bytes(b"garbage" * 10)
    assert main(["predict", str(not_model), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a safetensors model file" in err and err.count("\n") == 1
    assert main(["train", "--model", "gru", "--store", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "not a feature store" in capsys.readouterr().err
    assert main(["train", "--model", "gru", "--store", str(pipeline / "store"), "--out", str(pipeline / "gru")]) == 2
    assert "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["featurize", "--data", "x", "--out", "y", "--shard", "3/2"])
    with pytest.raises(SystemExit):
        main(["train", "--model", "gru", "--store", "s", "--out", "o", "--workers", "-1"])
    resume_other = [
        "train",
        "--model",
        "transformer",
        "--store",
        str(pipeline / "store"),
        "--out",
        str(pipeline / "gru"),
        "--resume",
    ]
    assert main(resume_other) == 2
    assert "started with model 'gru'" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--model",
                "gru",
                "--store",
                str(pipeline / "store"),
                "--out",
                str(tmp_path / "g"),
                "--accelerator",
                "nonsense",
            ]
        )
        == 2
    )
    assert "cannot use --accelerator nonsense" in capsys.readouterr().err


def test_every_epoch_is_checkpointed_for_resume(pipeline, tmp_path):
    # A high learning rate makes validation loss go up and down; last.ckpt must follow every epoch anyway.
    run = tmp_path / "run"
    assert (
        main(
            [
                "-q",
                "train",
                "--model",
                "gru",
                "--store",
                str(pipeline / "store"),
                "--out",
                str(run),
                "--epochs",
                "3",
                "--batch-size",
                "8",
                "--lr",
                "5e-2",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2
    best = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    logged = pd.read_csv(run / "logs" / "metrics.csv")
    assert best["epoch"] == int(logged.loc[logged["val_loss"].idxmin(), "epoch"])


def test_killed_training_resumes_from_the_saved_epoch(pipeline, tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "genreclf",
        "-q",
        "train",
        "--model",
        "gru",
        "--store",
        str(pipeline / "store"),
        "--out",
        str(run),
        "--epochs",
        "30",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--workers",
        "0",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (run / "checkpoints" / "last.ckpt").exists():
        time.sleep(0.1)
    time.sleep(0.5)  # let the checkpoint file be complete (written atomically by Lightning)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "model.safetensors").exists(), "training finished before it could be interrupted"
    saved_epoch = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"]
    resume = [
        "-q",
        "train",
        "--model",
        "gru",
        "--store",
        str(pipeline / "store"),
        "--out",
        str(run),
        "--epochs",
        str(saved_epoch + 2),
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--workers",
        "0",
        "--resume",
    ]
    assert main(resume) == 0
    info = json.loads((run / "train.json").read_text())
    assert info["epochs"] == saved_epoch + 2
    logged = pd.read_csv(run / "logs" / "metrics.csv")
    epochs = sorted(set(logged.dropna(subset=["val_loss"])["epoch"].astype(int)))
    assert epochs[-2:] == [saved_epoch, saved_epoch + 1]  # continued, not restarted


def test_model_file_for_other_audio_settings_is_refused(pipeline, tmp_path):
    import dataclasses

    from genreclf.audio import SignalConfig
    from genreclf.errors import GenreclfError

    mf = ModelFile.load(pipeline / "gru" / "model.safetensors")
    other = dataclasses.replace(mf, signal=SignalConfig(sample_rate=22050))
    path = other.save(tmp_path / "other.safetensors")
    with pytest.raises(GenreclfError, match="other audio settings"):
        ModelFile.load(path)
    assert main(["evaluate", str(path), "--store", str(pipeline / "store")]) == 2


def _train(pipeline, run, *extra):
    return main(
        [
            "-q",
            "train",
            "--model",
            "gru",
            "--store",
            str(pipeline / "store"),
            "--out",
            str(run),
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
            *extra,
        ]
    )


@pytest.mark.parametrize("workers", ["0", "1"])
def test_resumed_run_equals_an_uninterrupted_one(pipeline, tmp_path, workers):
    # With a DataLoader worker, batches are prefetched before the epoch's callbacks run: the sampler
    # must already know the epoch it resumes at, or it replays epoch 0's crops. Dropout must also
    # draw the same masks (Lightning does not restore torch's RNG).
    assert _train(pipeline, tmp_path / "straight", "--epochs", "3", "--workers", workers) == 0
    assert _train(pipeline, tmp_path / "resumed", "--epochs", "1", "--workers", workers) == 0
    assert _train(pipeline, tmp_path / "resumed", "--epochs", "3", "--workers", workers, "--resume") == 0
    a, b = (
        torch.load(tmp_path / r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        for r in ("straight", "resumed")
    )
    assert a["epoch"] == b["epoch"] == 2
    for name, weight in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], weight, rtol=0, atol=0)
    curves = [pd.read_csv(tmp_path / r / "logs" / "metrics.csv") for r in ("straight", "resumed")]
    np.testing.assert_allclose(curves[0]["train_loss"], curves[1]["train_loss"], rtol=0, atol=0)


def test_resume_refuses_other_settings_and_evaluate_uses_the_trained_split(pipeline, tmp_path, capsys):
    from genreclf.data import split_positions
    from genreclf.evaluate import evaluate

    run = tmp_path / "ref3"
    assert _train(pipeline, run, "--epochs", "1", "--workers", "0", "--split", "reference", "--seed", "3") == 0
    assert _train(pipeline, run, "--epochs", "2", "--workers", "0", "--resume") == 2  # official, seed 0 now
    err = capsys.readouterr().err
    assert "split='reference'" in err and "seed=3" in err and err.count("\n") == 1
    assert (
        _train(
            pipeline,
            run,
            "--epochs",
            "2",
            "--workers",
            "0",
            "--resume",
            "--split",
            "reference",
            "--seed",
            "3",
            "--pos-weight",
            "2",
        )
        == 2
    )
    assert "pos_weight" in capsys.readouterr().err
    assert (
        _train(pipeline, run, "--epochs", "2", "--workers", "0", "--resume", "--split", "reference", "--seed", "3") == 0
    )  # only --epochs changed: fine
    (run / "settings.json").rename(run / "old_settings.json")  # as a run started by an older genreclf
    assert (
        _train(pipeline, run, "--epochs", "3", "--workers", "0", "--resume", "--split", "reference", "--seed", "3") == 2
    )
    assert "older genreclf" in capsys.readouterr().err
    (run / "old_settings.json").rename(run / "settings.json")

    store = FeatureStore.open(pipeline / "store")
    own = evaluate(run, pipeline / "store", progress=False)  # the split and seed it was trained with
    assert (own["split"], own["seed"], own["n_seen_in_training"]) == ("reference", 3, 0)
    other = evaluate(run, pipeline / "store", split="official", progress=False)
    seen = np.intersect1d(
        split_positions(store, "test", "official"), split_positions(store, "training", "reference", 3)
    )
    assert other["n_seen_in_training"] == len(seen)


def test_damaged_model_metadata_and_bad_waveforms_get_one_line_errors(pipeline, tmp_path):
    import dataclasses

    from genreclf.errors import GenreclfError

    mf = ModelFile.load(pipeline / "gru" / "model.safetensors")
    path = dataclasses.replace(mf, genres=mf.genres[:10]).save(tmp_path / "short.safetensors")
    with pytest.raises(GenreclfError, match="10 genre names and 163 ids"):
        ModelFile.load(path)
    tagger = Tagger.load(pipeline / "gru")
    with pytest.raises(GenreclfError, match="NaN or infinite"):
        tagger.predict(np.full(16000, np.nan, np.float32))


def _help(capsys, *command: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere


def test_defaults_are_the_librarys_own_and_help_shows_them(capsys):
    from genreclf.cli import build_parser
    from genreclf.config import FitConfig, PretrainConfig, TrainConfig
    from genreclf.featurize import CLIP_TIMEOUT, MIN_SECONDS
    from genreclf.predict import CROP_FRAMES, N_CROPS

    parse = build_parser().parse_args
    fit, optim, pre = FitConfig(), TrainConfig(), PretrainConfig()
    train = parse(["train", "--model", "gru", "--store", "s", "--out", "o"])
    got = (
        train.epochs,
        train.batch_size,
        train.min_crop,
        train.max_crop,
        train.split,
        train.seed,
        train.workers,
        train.early_stopping,
        train.pretrained,
        train.accelerator,
        train.devices,
    )
    assert got == (
        fit.epochs,
        fit.batch_size,
        fit.min_crop,
        fit.max_crop,
        fit.split,
        fit.seed,
        fit.workers,
        fit.early_stopping,
        fit.pretrained,
        fit.accelerator,
        fit.devices,
    )
    assert (train.lr, train.pos_weight, train.weight_decay, train.plateau_patience) == (
        optim.lr,
        optim.pos_weight,
        optim.weight_decay,
        optim.plateau_patience,
    )
    losses = ("loss", "focal_gamma", "focal_alpha", "asl_gamma_pos", "asl_gamma_neg", "asl_clip")
    assert {k: getattr(train, k) for k in losses} == {k: getattr(optim, k) for k in losses}
    pretrain = parse(["pretrain", "--store", "s", "--out", "o"])
    assert (pretrain.masking, pretrain.lr, pretrain.mask_ratio, pretrain.plateau_patience) == (
        pre.masking,
        pre.lr,
        pre.mask_ratio,
        pre.plateau_patience,
    )
    assert parse(["pretrain", "--store", "s", "--out", "o", "--masking", "reference"]).masking == "reference"
    featurize = parse(["featurize", "--data", "d", "--out", "o"])
    assert (featurize.min_seconds, featurize.clip_timeout) == (MIN_SECONDS, CLIP_TIMEOUT)
    for command in (["evaluate", "m", "--store", "s"], ["predict", "m", "f"]):
        args = parse(command)
        assert (args.crop, args.crops) == (CROP_FRAMES, N_CROPS)

    text = _help(capsys, "train").split(" options: ")[1]
    for option, value in (
        ("--lr LR", optim.lr),
        ("--plateau-patience PLATEAU_PATIENCE", optim.plateau_patience),
        ("--max-crop MAX_CROP", fit.max_crop),
        ("--devices DEVICES", fit.devices),
        ("--epochs EPOCHS", fit.epochs),
        ("--loss {bce,focal,asymmetric,lsep}", optim.loss),
        ("--focal-alpha FOCAL_ALPHA", optim.focal_alpha),
        ("--asl-clip ASL_CLIP", optim.asl_clip),
    ):
        after = text[text.index(option) :]
        assert after[: after.index(" --", 2)].endswith(f"(default: {value})"), option
    assert f"(default: {pre.lr})" in _help(capsys, "pretrain")
    assert f"(default: {CLIP_TIMEOUT})" in _help(capsys, "featurize")
    assert f"(default: {N_CROPS})" in _help(capsys, "predict")
    for command in ("synth", "featurize", "train", "evaluate", "calibrate", "predict", "report", "demo"):
        text = _help(capsys, command)
        assert "(default: None)" not in text and "(default: False)" not in text
        assert re.search(r"\(default \d", text) is None, f"a hand-written default in `{command} --help`"


def test_top_level_help_imports_neither_torch_nor_lightning():
    code = (
        "import sys\nfrom genreclf.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted({'torch', 'lightning'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "[]"


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_and_verbose_before_or_after_the_command(where):
    from genreclf.cli import build_parser

    command = ["featurize", "--data", "d", "--out", "o"]
    for flag, quiet, verbose in (
        ("-q", True, False),
        ("--quiet", True, False),
        ("-v", False, True),
        ("--verbose", False, True),
    ):
        args = build_parser().parse_args([flag, *command] if where == "before" else [*command, flag])
        assert (args.quiet, args.verbose) == (quiet, verbose), flag
    args = build_parser().parse_args(command)
    assert (args.quiet, args.verbose) == (False, False)
    download = ["data", "download", "--subset", "small", "--to", "x"]  # a command of a command
    assert build_parser().parse_args(["-q", *download] if where == "before" else [*download, "-q"]).quiet


def test_quiet_after_the_command_hides_the_progress(pipeline, tmp_path, caplog):
    import logging

    evaluate = [
        "evaluate",
        str(pipeline / "gru"),
        "--store",
        str(pipeline / "store"),
        "--crops",
        "1",
        "--out",
        str(tmp_path / "metrics.json"),
    ]

    def progress_lines() -> list[str]:  # stderr is not a terminal under pytest: progress comes as log lines
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluate: ")]
        caplog.clear()
        return lines

    with caplog.at_level(logging.INFO, logger="genreclf"):
        assert main(evaluate) == 0
        lines = progress_lines()
        assert lines and all("track" in line and "ETA" in line for line in lines)
        assert main([*evaluate, "-q"]) == 0
        assert progress_lines() == []


@pytest.mark.parametrize(
    "command,hint",
    [
        (["evaluate", "m", "--store", "s"], "for the test part use --part test"),
        (["report", "run", "--out", "o"], "the report always scores the test part"),
    ],
)
def test_split_given_a_part_name_points_to_the_right_option(command, hint, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--split", "test"])
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert errors == [
        f"genreclf {command[0]}: error: argument --split: 'test' is a part, not a split (official or reference); {hint}"
    ]
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--split", "nonsense"])
    assert exit_.value.code == 2 and "invalid choice: 'nonsense'" in capsys.readouterr().err


def test_evaluate_whole_sequence(pipeline, tmp_path):
    from genreclf.data import split_positions
    from genreclf.evaluate import predict_store

    out = tmp_path / "metrics.json"
    assert (
        main(
            [
                "-q",
                "evaluate",
                str(pipeline / "gru"),
                "--store",
                str(pipeline / "store"),
                "--crops",
                "2",
                "--whole-sequence",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    whole = json.loads(out.read_text())["metrics_whole_sequence"]
    assert all(0.0 <= whole[key] <= 1.0 for key in ("ap_weighted", "ap_micro", "ap_macro", "roc_auc_macro"))
    store = FeatureStore.open(pipeline / "store")
    model = ModelFile.load(pipeline / "gru" / "model.safetensors").model
    expected = predict_store(model, store, split_positions(store, "test"), crop=None)
    np.testing.assert_allclose(np.load(tmp_path / "predictions.npz")["scores_whole"], expected, rtol=1e-5)


def _predict_inputs(real_mp3, tmp_path):
    """Return a real FMA track, a broken file and a folder without audio, as command-line arguments."""
    bad = write_bad_files(tmp_path / "bad")["random"]
    empty = tmp_path / "no_audio"
    empty.mkdir()
    return [str(real_mp3), str(bad), str(empty)]


def test_predict_csv(pipeline, real_mp3, tmp_path, capsys):
    inputs = _predict_inputs(real_mp3, tmp_path)
    assert main(["predict", str(pipeline / "transformer"), *inputs, "--format", "csv", "--top", "3"]) == 1
    out, err = capsys.readouterr()
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["file", "rank", "genre", "probability", "chosen", "error"]
    prediction = Tagger.load(pipeline / "transformer").predict(real_mp3)
    top, chosen = prediction.top(3), prediction.chosen()
    good = [r for r in rows[1:] if r[0] == str(real_mp3)]
    assert [(r[1], r[2], r[5]) for r in good] == [(str(k), g, "") for k, (g, _) in enumerate(top, 1)]
    np.testing.assert_allclose([float(r[3]) for r in good], [p for _, p in top], atol=5e-5)
    assert [r[4] for r in good] == ["1" if g in chosen else "0" for g, _ in top]
    errors = sorted((r for r in rows[1:] if r[0] != str(real_mp3)), key=lambda r: inputs.index(r[0]))
    assert [r[0] for r in errors] == inputs[1:] and all(r[1:5] == ["", "", "", ""] for r in errors)
    assert "not a readable audio file" in errors[0][5] and "no audio files found" in errors[1][5]
    assert "2 input(s) could not be tagged" in err


def test_predict_table(pipeline, real_mp3, tmp_path, capsys):
    inputs = _predict_inputs(real_mp3, tmp_path)
    assert main(["predict", str(pipeline / "gru"), *inputs, "--top", "4"]) == 1
    out = capsys.readouterr().out
    blocks = {b.split("\n", 1)[0]: b.split("\n")[1:] for b in re.split(r"\n(?=\S)", out.rstrip("\n"))}
    assert sorted(blocks) == sorted(inputs)  # each input once, in the order they finished
    prediction = Tagger.load(pipeline / "gru").predict(real_mp3)
    top, chosen = prediction.top(4), prediction.chosen()
    good = blocks[inputs[0]]
    assert len(good) == 4 + 1
    for line, (genre, p) in zip(good[:4], top, strict=True):
        assert re.fullmatch(r"   [01]\.\d{3} [* ] \S.*", line), line
        shown, name = line[:8], line[11:]
        assert name == genre and abs(float(shown) - p) <= 6e-4
        assert line[9] == ("*" if genre in chosen else " ")
    assert good[4] == "  chosen: " + (", ".join(chosen) or "(none)")
    (bad,), (empty,) = blocks[inputs[1]], blocks[inputs[2]]
    assert bad.startswith("  error: ") and "not a readable audio file" in bad
    assert empty.startswith("  error: ") and "no audio files found" in empty
    assert main(["predict", str(pipeline / "gru"), str(real_mp3)]) == 0  # nothing failed
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == str(real_mp3) and len(out.splitlines()) == 7 and err == ""  # 5 genres, chosen


def test_train_chooses_thresholds_on_the_validation_split(pipeline):
    from genreclf.data import split_positions
    from genreclf.decide import choose_thresholds
    from genreclf.evaluate import predict_store

    store = FeatureStore.open(pipeline / "store")
    positions = split_positions(store, "validation")
    for model in ("gru", "transformer"):
        mf = ModelFile.load(pipeline / model / "model.safetensors")
        t = mf.thresholds
        assert (t["split"], t["part"], t["n_tracks"]) == ("official", "validation", len(positions))
        assert len(t["values"]) == 163 and "F1" in t["rule"] and t["crops"] == {"length": 256, "count": 8}
        assert mf.genre_parents == list(store.header.genre_parents)
        # The best model's probabilities on the validation tracks give the stored thresholds again.
        again = choose_thresholds(predict_store(mf.model, store, positions), store.targets[positions])
        np.testing.assert_allclose(t["values"], again.values, atol=1e-6)
        assert t["chosen_by"] == again.chosen_by and t["positives"] == again.positives.tolist()


def _without_decisions(source, path):
    """Copy a model file as genreclf wrote it before decisions: no thresholds, no genre tree."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    old = {k: v for k, v in meta.items() if k not in ("thresholds", "genre_parents")}
    save_file(tensors, str(path), metadata=old)
    return meta, tensors


def test_calibrate_adds_thresholds_to_an_old_model_file(pipeline, real_mp3, tmp_path, capsys, caplog):
    from safetensors import safe_open

    old = tmp_path / "old" / "model.safetensors"
    old.parent.mkdir()
    meta, tensors = _without_decisions(pipeline / "gru" / "model.safetensors", old)
    mf = ModelFile.load(old)  # an old file still loads and predicts
    assert mf.thresholds is None and mf.genre_parents == []
    assert main(["predict", str(old), str(real_mp3), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["chosen"] is None and "genreclf calibrate" in caplog.text
    assert main(["predict", str(old), str(real_mp3), "--threshold", "0.5", "--with-parents"]) == 2
    assert "genre tree" in capsys.readouterr().err
    assert main(["-q", "calibrate", str(old.parent), "--store", str(pipeline / "store")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"thresholds written to {old}: ") and "validation tracks of the official split" in out
    with safe_open(str(old), framework="pt") as f:  # the same weights and metadata, and the decisions added
        again = f.metadata()
        for k in f.keys():  # noqa: SIM118
            assert torch.equal(f.get_tensor(k), tensors[k]), k
    assert again.keys() == meta.keys() and all(again[k] == meta[k] for k in meta if k != "thresholds")
    values = json.loads(again["thresholds"])["values"]
    np.testing.assert_allclose(values, json.loads(meta["thresholds"])["values"], atol=1e-6)
    assert main(["predict", str(old), str(real_mp3), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["chosen"] == Tagger.load(old).predict(real_mp3).chosen()


def test_predict_chosen_genres_pass_their_thresholds(pipeline, real_mp3, capsys):
    from genreclf.metadata import load_genres

    model = pipeline / "transformer"
    thresholds = np.array(ModelFile.load(model / "model.safetensors").thresholds["values"])
    p = Tagger.load(model).predict(real_mp3).probabilities
    genres = ModelFile.load(model / "model.safetensors").genres
    by_probability = [genres[c] for c in np.argsort(-p, kind="stable")]

    def chosen(*flags: str) -> list[str]:
        assert main(["predict", str(model), str(real_mp3), "--format", "json", *flags]) == 0
        return json.loads(capsys.readouterr().out)["chosen"]  # JSON Lines: one object per file

    assert chosen() == [g for g in by_probability if p[genres.index(g)] >= thresholds[genres.index(g)]]
    cut = float(np.sort(p)[-6])  # a global threshold: the six most probable pass
    assert chosen("--threshold", str(cut)) == by_probability[:6]
    # --with-parents: the chosen ones, then every ancestor (genres.csv) of each not chosen already.
    tree = load_genres(pipeline / "corpus" / "fma_metadata" / "genres.csv")
    name = dict(zip(tree.ids.tolist(), tree.names))
    ids = {n: i for i, n in name.items()}
    with_parents = chosen("--threshold", str(cut), "--with-parents")
    assert with_parents[:6] == by_probability[:6]
    ancestors = {name[a] for g in by_probability[:6] for a in tree.ancestors(ids[g])}
    assert set(with_parents[6:]) == ancestors - set(by_probability[:6]) and len(set(with_parents)) == len(with_parents)


def _corpus_files(pipeline) -> list[str]:
    return [str(p) for p in sorted((pipeline / "corpus" / "fma_large").rglob("*.mp3"))]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_predict_out_records_each_file_once_and_a_broken_one_sets_the_exit_status(pipeline, tmp_path, suffix, capsys):
    files = _corpus_files(pipeline)[:5]
    bad = str(write_bad_files(tmp_path / "bad")["truncated"])
    out = tmp_path / f"results{suffix}"
    args = ["predict", str(pipeline / "gru"), *files[:3], bad, *files[3:], "--out", str(out), "--top", "2"]
    assert main([*args, "--workers", "2"]) == 1
    assert "1 input(s) could not be tagged" in capsys.readouterr().err
    tagger = Tagger.load(pipeline / "gru")
    expected = {f: tagger.predict(f).top(2) for f in files}
    if suffix == ".jsonl":
        records = {r["file"]: r for r in map(json.loads, out.read_text().splitlines())}
        assert sorted(records) == sorted([*files, bad])
        assert set(records[bad]) == {"file", "error"} and "not a readable audio file" in records[bad]["error"]
        for f in files:
            assert [g["genre"] for g in records[f]["genres"]] == [g for g, _ in expected[f]]
            np.testing.assert_allclose(
                [g["probability"] for g in records[f]["genres"]], [p for _, p in expected[f]], atol=5e-5
            )
    else:
        rows = list(csv.reader(io.StringIO(out.read_text())))
        assert rows[0] == ["file", "rank", "genre", "probability", "chosen", "error"]
        assert sorted(r[0] for r in rows[1:]) == sorted([*[f for f in files for _ in range(2)], bad])
        (bad_row,) = [r for r in rows if r[0] == bad]
        assert bad_row[1:5] == ["", "", "", ""] and "not a readable audio file" in bad_row[5]
        for f in files:
            assert [(r[1], r[2]) for r in rows if r[0] == f] == [(str(k), g) for k, (g, _) in enumerate(expected[f], 1)]
    assert main(args) == 2  # the file exists: refused without --resume
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0  # all recorded (the error too): nothing left to do
    assert capsys.readouterr().out == ""


def test_predict_resume_after_a_killed_run_does_only_the_rest(pipeline, tmp_path, capsys):
    files = _corpus_files(pipeline)
    out = tmp_path / "results.jsonl"
    command = [sys.executable, "-m", "genreclf", "-q", "predict", str(pipeline / "gru"), str(pipeline / "corpus")]
    env = {**os.environ, "PYTHONPATH": str(Path(genreclf.__file__).parents[1])}  # this checkout's code
    run = subprocess.Popen(
        [*command, "--out", str(out), "--workers", "1", "--format", "json"], stdout=subprocess.PIPE, env=env
    )
    first = run.stdout.readline()  # a pipe sees the first record as soon as it is done
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    assert json.loads(first)["file"] in files
    done = [json.loads(line)["file"] for line in out.read_text().splitlines()]
    assert 1 <= len(done) < len(files)
    todo = [f for f in files if f not in done]
    with out.open("a") as f:  # as a kill in the middle of a write would leave it
        f.write(json.dumps({"file": todo[0], "genres": []})[:20])
    resume = ["predict", str(pipeline / "gru"), str(pipeline / "corpus"), "--out", str(out), "--resume"]
    assert main([*resume, "--format", "json"]) == 0
    resumed = [json.loads(line)["file"] for line in capsys.readouterr().out.splitlines()]
    assert sorted(resumed) == todo  # only the rest, the half-written one included
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["file"] for r in records) == files and all(len(r["genres"]) == 5 for r in records)
