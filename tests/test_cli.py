"""End to end through the command line: synth -> featurize -> train -> evaluate -> predict."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import write_bad_files
from genreclf.cli import main
from genreclf.store import FeatureStore
from genreclf.modelfile import ModelFile
from genreclf.models import count_parameters
from genreclf.predict import Tagger

TRAIN = ["--epochs", "1", "--batch-size", "8", "--lr", "1e-3", "--workers", "0"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Run the whole pipeline once through the CLI; return its folder."""
    root = tmp_path_factory.mktemp("e2e")
    assert main(["-q", "synth", str(root / "corpus"), "--tracks", "24", "--seconds", "3", "--seed", "1"]) == 0
    assert main(["-q", "featurize", "--data", str(root / "corpus"), "--out", str(root / "store"),
                 "--workers", "2"]) == 0
    for model in ("gru", "transformer"):
        assert main(["-q", "train", "--model", model, "--store", str(root / "store"), "--out",
                     str(root / model), *TRAIN]) == 0
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
    records = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in records] == [str(real_mp3), str(bad)]
    top = records[0]["genres"]
    assert len(top) == 3 and top[0]["probability"] >= top[1]["probability"] >= top[2]["probability"]
    assert "error" in records[1] and "cannot decode" in records[1]["error"]


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
    resume_other = ["train", "--model", "transformer", "--store", str(pipeline / "store"), "--out",
                    str(pipeline / "gru"), "--resume"]
    assert main(resume_other) == 2
    assert "started with model 'gru'" in capsys.readouterr().err
    assert main(["train", "--model", "gru", "--store", str(pipeline / "store"), "--out", str(tmp_path / "g"),
                 "--accelerator", "nonsense"]) == 2
    assert "cannot use --accelerator nonsense" in capsys.readouterr().err


def test_every_epoch_is_checkpointed_for_resume(pipeline, tmp_path):
    # A high learning rate makes validation loss go up and down; last.ckpt must follow every epoch anyway.
    run = tmp_path / "run"
    assert main(["-q", "train", "--model", "gru", "--store", str(pipeline / "store"), "--out", str(run),
                 "--epochs", "3", "--batch-size", "8", "--lr", "5e-2", "--workers", "0"]) == 0
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2
    best = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    logged = pd.read_csv(run / "logs" / "metrics.csv")
    assert best["epoch"] == int(logged.loc[logged["val_loss"].idxmin(), "epoch"])


def test_killed_training_resumes_from_the_saved_epoch(pipeline, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "genreclf", "-q", "train", "--model", "gru", "--store", str(pipeline / "store"),
           "--out", str(run), "--epochs", "30", "--batch-size", "4", "--lr", "1e-3", "--workers", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (run / "checkpoints" / "last.ckpt").exists():
        time.sleep(0.1)
    time.sleep(0.5)  # let the checkpoint file be complete (written atomically by Lightning)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "model.safetensors").exists(), "training finished before it could be interrupted"
    saved_epoch = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"]
    resume = ["-q", "train", "--model", "gru", "--store", str(pipeline / "store"), "--out", str(run),
              "--epochs", str(saved_epoch + 2), "--batch-size", "4", "--lr", "1e-3", "--workers", "0", "--resume"]
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
    return main(["-q", "train", "--model", "gru", "--store", str(pipeline / "store"), "--out", str(run),
                 "--batch-size", "8", "--lr", "1e-3", *extra])


@pytest.mark.parametrize("workers", ["0", "1"])
def test_resumed_run_equals_an_uninterrupted_one(pipeline, tmp_path, workers):
    # With a DataLoader worker, batches are prefetched before the epoch's callbacks run: the sampler
    # must already know the epoch it resumes at, or it replays epoch 0's crops. Dropout must also
    # draw the same masks (Lightning does not restore torch's RNG).
    assert _train(pipeline, tmp_path / "straight", "--epochs", "3", "--workers", workers) == 0
    assert _train(pipeline, tmp_path / "resumed", "--epochs", "1", "--workers", workers) == 0
    assert _train(pipeline, tmp_path / "resumed", "--epochs", "3", "--workers", workers, "--resume") == 0
    a, b = (torch.load(tmp_path / r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
            for r in ("straight", "resumed"))
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
    assert _train(pipeline, run, "--epochs", "2", "--workers", "0", "--resume", "--split", "reference",
                  "--seed", "3", "--pos-weight", "2") == 2
    assert "pos_weight" in capsys.readouterr().err
    assert _train(pipeline, run, "--epochs", "2", "--workers", "0", "--resume", "--split", "reference",
                  "--seed", "3") == 0  # only --epochs changed: fine
    (run / "settings.json").rename(run / "old_settings.json")  # as a run started by an older genreclf
    assert _train(pipeline, run, "--epochs", "3", "--workers", "0", "--resume", "--split", "reference",
                  "--seed", "3") == 2
    assert "older genreclf" in capsys.readouterr().err
    (run / "old_settings.json").rename(run / "settings.json")

    store = FeatureStore.open(pipeline / "store")
    own = evaluate(run, pipeline / "store", progress=False)  # the split and seed it was trained with
    assert (own["split"], own["seed"], own["n_seen_in_training"]) == ("reference", 3, 0)
    other = evaluate(run, pipeline / "store", split="official", progress=False)
    seen = np.intersect1d(split_positions(store, "test", "official"), split_positions(store, "training",
                                                                                      "reference", 3))
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
