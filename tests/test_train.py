"""Training runs on the fixture store: the crops each epoch draws, resume, metrics.csv, what a run leaves behind."""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from genreclf.cli import main
from genreclf.config import FitConfig, PretrainConfig, TrainConfig
from genreclf.data import CropBatchSampler, EvenCropSampler, loader, split_positions
from genreclf.datamodule import RunData, check_cache, check_fits, memory_available
from genreclf.errors import GenreclfError
from genreclf.lightning_modules import TaggerModule
from genreclf.modelfile import ModelFile
from genreclf.models import GRUConfig
from genreclf.store import FeatureStore
from genreclf.train import EpochLog, _trainer, pretrain, train

# early_stopping: its state is in the checkpoints too (it never stops runs this short)
FIT = FitConfig(model="gru", epochs=2, batch_size=8, seed=3, accelerator="cpu", early_stopping=5)
OPTIM = TrainConfig(lr=1e-3)


class Batches(Callback):
    """Records the batches the model receives, by epoch."""

    def __init__(self) -> None:
        self.seen: dict[int, list[dict[str, torch.Tensor]]] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.seen.setdefault(trainer.current_epoch, []).append({k: v.clone() for k, v in batch.items()})


def drawn(store: FeatureStore, fit: FitConfig, epoch: int) -> list[dict[str, torch.Tensor]]:
    """Return the batches a fresh CropBatchSampler draws for `epoch` (default_rng([seed, epoch]))."""
    positions = split_positions(store, "training", fit.split, fit.seed)
    sampler = CropBatchSampler(
        store.valid_frames, positions, fit.batch_size, fit.min_crop, fit.max_crop, fit.seed, first_epoch=epoch
    )
    return list(loader(store, sampler))


def rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def runs(store_dir, tmp_path_factory) -> dict:
    """Uninterrupted 2-epoch runs with 0 and 1 workers; a 1-epoch run resumed to 3 epochs (1 worker)."""
    root = tmp_path_factory.mktemp("train")
    out: dict = {}
    for workers in (0, 1):
        seen = Batches()
        train(
            store_dir,
            root / f"w{workers}",
            dataclasses.replace(FIT, workers=workers),
            OPTIM,
            progress=False,
            callbacks=[seen],
        )
        out[f"w{workers}"] = seen.seen
    resumed = root / "resumed"
    first, then = Batches(), Batches()
    train(store_dir, resumed, dataclasses.replace(FIT, epochs=1, workers=1), OPTIM, progress=False, callbacks=[first])
    metrics = resumed / "logs" / "metrics.csv"
    shutil.copy(metrics, root / "before_resume.csv")
    # As if killed after epoch 1 was logged but before its checkpoint was written.
    with open(metrics, "a") as f:
        f.write("1,99.0,99.0,0.001,1.0\n")
    train(
        store_dir,
        resumed,
        dataclasses.replace(FIT, epochs=3, workers=1),
        OPTIM,
        resume=True,
        progress=False,
        callbacks=[then],
    )
    out["resumed"] = {**first.seen, **then.seen}
    out["root"] = root
    return out


@pytest.mark.parametrize("run, epochs", [("w0", 2), ("w1", 2), ("resumed", 3)])
def test_each_epoch_trains_on_the_crops_the_sampler_draws_for_it(runs, store_dir, run, epochs):
    store = FeatureStore.open(store_dir)
    seen = runs[run]
    assert sorted(seen) == list(range(epochs))
    for epoch in range(epochs):
        want = drawn(store, FIT, epoch)
        assert len(seen[epoch]) == len(want), epoch
        for got, expected in zip(seen[epoch], want):
            assert list(got) == list(expected)  # "lengths" too, where a crop is padded
            for key in got:
                torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=f"epoch {epoch} {key}")
    first, second = seen[0][0]["x"], seen[1][0]["x"]
    assert first.shape != second.shape or not torch.equal(first, second)  # each epoch draws new crops


@pytest.mark.parametrize("run, epochs", [("w0", 2), ("resumed", 3)])
def test_metrics_csv_has_one_row_per_epoch(runs, run, epochs):
    header, logged = rows(runs["root"] / run / "logs" / "metrics.csv")
    assert header == list(EpochLog.COLUMNS)
    assert [int(r["epoch"]) for r in logged] == list(range(epochs))  # consecutive, no duplicates
    for r in logged:
        values = {k: float(r[k]) for k in EpochLog.COLUMNS}
        assert all(math.isfinite(v) for v in values.values()), r
        assert values["train_loss"] > 0 and values["val_loss"] > 0 and values["lr"] == OPTIM.lr, r
        assert values["epoch_seconds"] >= 0
    if run == "resumed":  # the epoch before the checkpoint is kept as it was; the unsaved one is redone
        _, before = rows(runs["root"] / "before_resume.csv")
        assert logged[:1] == before and float(logged[1]["train_loss"]) != 99.0


class RunsCode:
    """Unpickling this creates a file: what a malicious checkpoint could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_resume_refuses_a_checkpoint_that_would_run_code(store_dir, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "ran"
    (run / "checkpoints").mkdir(parents=True)
    hparams = {"model_config": {"kind": "gru", "n_genres": 163}}
    last = run / "checkpoints" / "last.ckpt"
    torch.save({"epoch": 0, "hyper_parameters": hparams, "payload": RunsCode(marker)}, last)
    with pytest.raises(GenreclfError) as err:
        train(store_dir, run, FIT, OPTIM, resume=True, progress=False)
    assert "last.ckpt holds objects other than tensors" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()
    torch.load(last, weights_only=False)["payload"].close()  # what the refusal prevents
    assert marker.exists()


def test_checkpoints_hold_only_plain_values(runs):
    for name in ("last.ckpt", "best.ckpt"):
        checkpoint = torch.load(runs["root"] / "resumed" / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert checkpoint["hyper_parameters"]["model_config"]["kind"] == "gru"


def test_default_is_one_device_even_on_a_multi_gpu_node(monkeypatch, tmp_path):
    # Lightning is told there are 4 GPUs (its CUDA probes, not ours, are replaced: no GPU is needed here).
    import lightning.fabric.accelerators.cuda as fabric_cuda
    import lightning.pytorch.accelerators.cuda as pytorch_cuda
    from lightning.fabric.utilities import device_parser

    for module in (fabric_cuda, pytorch_cuda, device_parser):
        for name, fake in (("num_cuda_devices", lambda: 4), ("is_cuda_available", lambda: True)):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, fake)
    assert _trainer(tmp_path, FitConfig(devices="auto"), progress=False).num_devices == 4  # the fake works
    trainer = _trainer(tmp_path, FitConfig(), progress=False)
    assert trainer.num_devices == 1 and type(trainer.strategy).__name__ == "SingleDeviceStrategy"


def test_train_leaves_warning_filters_and_log_levels_as_they_were(store_dir, tmp_path):
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        filters = list(warnings.filters)
        train(store_dir, tmp_path / "run", dataclasses.replace(FIT, epochs=1, workers=0), OPTIM, progress=False)
        assert warnings.filters == filters
        assert logger.level == logging.INFO
    finally:
        logger.setLevel(level)


@pytest.mark.parametrize("run", [train, pretrain])
def test_no_progress_bar_when_output_is_not_a_terminal(store_dir, tmp_path, capfd, run):
    assert not sys.stdout.isatty() and not sys.stderr.isatty()  # pytest captures both, as `> log 2>&1` would
    log = logging.getLogger("genreclf")
    handler, level = logging.StreamHandler(sys.stderr), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        fit = dataclasses.replace(FIT, epochs=2, workers=0)
        run(store_dir, tmp_path / "run", fit, OPTIM if run is train else PretrainConfig(), progress=True)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    out, err = capfd.readouterr()
    assert "\r" not in out and "\r" not in err  # Lightning's bar draws on stdout
    assert "epoch 1/2" in err and "epoch 2/2" in err  # EpochLog's line per epoch instead


def _losses(run: Path) -> list[tuple[str, str]]:
    return [(r["train_loss"], r["val_loss"]) for r in rows(run / "logs" / "metrics.csv")[1]]


def test_cache_ram_trains_as_the_memory_map_and_a_resume_may_change_the_cache(runs, store_dir, tmp_path, caplog):
    # The same seed reads the same batches from memory: the same losses and weights, to the bit.
    held, resumed = tmp_path / "ram", tmp_path / "resumed"
    with caplog.at_level(logging.INFO, logger="genreclf"):
        train(store_dir, held, dataclasses.replace(FIT, workers=1, cache="ram"), OPTIM, progress=False)
    assert "GB of features read into memory in" in caplog.text  # RunData.setup read them
    train(store_dir, resumed, dataclasses.replace(FIT, epochs=1, workers=0), OPTIM, progress=False)
    changed = dataclasses.replace(FIT, workers=0, cache="ram", precision="32")
    train(store_dir, resumed, changed, OPTIM, resume=True, progress=False)
    mapped = runs["root"] / "w0"
    want = ModelFile.load(mapped / "model.safetensors").model.state_dict()
    for run in (held, resumed):
        assert _losses(run) == _losses(mapped) and len(_losses(run)) == 2
        got = ModelFile.load(run / "model.safetensors").model.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_crops_cut_on_the_device_train_as_the_memory_map(store_dir, tmp_path):
    # --cache gpu's path on the CPU: index batches from the loader, crops cut in transfer_batch_to_device.
    store = FeatureStore.open(store_dir)
    train_pos, val_pos = split_positions(store, "training"), split_positions(store, "validation")
    fit = dataclasses.replace(FIT, epochs=1)
    seen, losses = {}, {}
    for cache in ("none", "gpu"):
        sampler = CropBatchSampler(store.valid_frames, train_pos, fit.batch_size, fit.min_crop, fit.max_crop, fit.seed)
        data = RunData(store, sampler, EvenCropSampler(store.valid_frames, val_pos, 8, 256), cache=cache)
        batches = Batches()
        trainer = _trainer(tmp_path / cache, fit, progress=False, extra=[batches])
        torch.manual_seed(0)
        trainer.fit(TaggerModule(GRUConfig(), OPTIM), datamodule=data)
        seen[cache], losses[cache] = batches.seen[0], {k: float(v) for k, v in trainer.callback_metrics.items()}
        assert data.loaders[0].dataset.index_only == (cache == "gpu") and data.device_features is None  # freed
    assert losses["gpu"] == losses["none"] and set(losses["gpu"]) >= {"train_loss", "val_loss"}
    assert len(seen["gpu"]) == len(seen["none"]) == len(sampler)
    for got, want in zip(seen["gpu"], seen["none"]):
        assert list(got) == list(want) and list(want) in (["x", "lengths", "y", "counted"], ["x", "y", "counted"])
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_cache_errors_are_one_line(store_dir, tmp_path, capsys):
    out = tmp_path / "run"
    for accelerator in ("auto", "cpu"):  # this machine has no CUDA GPU
        argv = ["train", "--model", "gru", "--store", str(store_dir), "--out", str(out), "--accelerator", accelerator]
        assert main([*argv, "--cache", "gpu"]) == 2
        err = capsys.readouterr().err
        assert "--cache gpu holds the features on the training GPU, but no CUDA GPU is available" in err
        assert err.count("\n") == 1 and not out.exists()  # refused before anything was written
    store = FeatureStore.open(store_dir)
    with pytest.raises(GenreclfError, match=r"^--cache ram needs [0-9.]+ GB of memory \(1000000 processes x "):
        check_cache(store, "ram", torch.device("cpu"), processes=10**6)
    check_cache(store, "ram", torch.device("cpu"), processes=1)  # 30 clips fit
    with pytest.raises(GenreclfError, match="needs 3.0 GB on cuda:0 but 2.0 GB is available; use --cache ram"):
        check_fits(3 * 10**9, 2 * 10**9, "gpu", "on cuda:0", "--cache ram")
    check_fits(3 * 10**9, None, "gpu", "on cuda:0", "--cache ram")  # unknown: not refused
    assert memory_available() > 0
    with pytest.raises(GenreclfError, match="unknown cache 'disk'; use one of none, ram, gpu"):
        FitConfig(cache="disk")
    with pytest.raises(GenreclfError, match="unknown precision '16'"):
        FitConfig(precision="16")
    with pytest.raises(SystemExit):
        main(["train", "--model", "gru", "--store", str(store_dir), "--out", str(out), "--precision", "64"])


class Autocast(Callback):
    """Records, for each forward pass of the model in training, whether CPU autocast was on and its dtype."""

    def __init__(self) -> None:
        self.seen: set[tuple[bool, torch.dtype]] = set()

    def on_fit_start(self, trainer, module) -> None:
        def hook(*_) -> None:
            if module.training:
                self.seen.add((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))

        module.model.register_forward_hook(hook)


@pytest.mark.parametrize("model", ["gru", "transformer"])
def test_bf16_mixed_precision_trains_on_the_cpu(store_dir, tmp_path, model):
    # The CPU fast paths (oneDNN layers, fastgru's layer) run under autocast, in float32.
    assert _trainer(tmp_path, FitConfig(), progress=False).precision == "32-true"  # auto, without a CUDA GPU
    autocast = Autocast()
    fit = dataclasses.replace(FIT, model=model, epochs=1, workers=0, min_crop=32, max_crop=64)
    result = train(
        store_dir,
        tmp_path / "run",
        dataclasses.replace(fit, precision="bf16-mixed"),
        OPTIM,
        progress=False,
        callbacks=[autocast],
    )
    assert autocast.seen == {(True, torch.bfloat16)} and math.isfinite(result.best_val_loss)
    assert all(math.isfinite(float(v)) for pair in _losses(tmp_path / "run") for v in pair)


def test_a_resumed_run_goes_on_at_the_learning_rate_set(store_dir, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    fit = dataclasses.replace(FIT, epochs=1)
    train(store_dir, run, fit, OPTIM, progress=False)
    with caplog.at_level(logging.INFO, logger="genreclf"):
        train(store_dir, run, dataclasses.replace(fit, epochs=3, set_lr=2e-4), OPTIM, resume=True, progress=False)
    assert "learning rate set to 0.0002 from epoch 2 on (it was 0.001)" in caplog.text  # epochs count from 1
    _, epochs = rows(run / "logs" / "metrics.csv")
    assert [float(row["lr"]) for row in epochs] == [1e-3, 2e-4, 2e-4]  # no plateau within 3 epochs
    assert all(math.isfinite(float(row["val_loss"])) for row in epochs)
    assert ModelFile.load(run / "model.safetensors").provenance["fit"]["set_lr"] == 2e-4
    # Only with --resume; a new run takes --lr. One line, nothing written.
    new = tmp_path / "new"
    argv = ["train", "--model", "gru", "--store", str(store_dir), "--out", str(new), "--accelerator", "cpu"]
    assert main([*argv, "--set-lr", "1e-4"]) == 2
    err = capsys.readouterr().err
    assert "--set-lr changes the learning rate of a resumed run (with --resume)" in err and err.count("\n") == 1
    assert not new.exists()
    with pytest.raises(SystemExit):
        main([*argv, "--resume", "--set-lr", "0"])
    with pytest.raises(GenreclfError, match="set_lr must be a positive learning rate"):
        FitConfig(set_lr=float("nan"))
