"""A NaN loss stops a run before it spoils the weights or a checkpoint; --resume continues from the last good epoch.

The NaN is real: features set to NaN in a copy of the fixture store's memory-mapped file, or a weight set to NaN.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import write_nan_features
from lightning.pytorch.callbacks import Callback

from genreclf.config import FitConfig, PretrainConfig, TrainConfig
from genreclf.errors import GenreclfError
from genreclf.nonfinite import StopOnNonFinite
from genreclf.train import pretrain, train

# 26 training tracks (4 batches of 8), 1 validation track; short crops for speed
FIT = FitConfig(model="gru", epochs=2, batch_size=8, min_crop=32, max_crop=100, seed=3, workers=0, accelerator="cpu")
OPTIM = TrainConfig(lr=1e-3)


@pytest.fixture
def store_copy(store_dir, tmp_path) -> Path:
    """A copy of the fixture store, to poison."""
    return Path(shutil.copytree(store_dir, tmp_path / "store"))


def nan_weights(module) -> None:
    with torch.no_grad():
        next(module.parameters()).fill_(math.nan)


class SpoilAt(Callback):
    """At epoch `epoch`'s start, keeps the checkpoints' bytes and spoils the run; are weights finite at the error?"""

    def __init__(self, run: Path, epoch: int, spoil: Callable) -> None:
        self.run, self.epoch, self.spoil = run, epoch, spoil
        self.saved: dict[str, bytes] = {}
        self.spoiled = None  # what spoil returned
        self.finite: bool | None = None

    def on_train_epoch_start(self, trainer, module) -> None:
        if trainer.current_epoch == self.epoch:
            self.saved = files(self.run / "checkpoints")
            self.spoiled = self.spoil(module)

    def on_exception(self, trainer, module, exception) -> None:
        self.finite = all(bool(torch.isfinite(p).all()) for p in module.parameters())


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.is_dir() else {}


def message(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("run", [train, pretrain])
def test_a_nan_weight_stops_the_run_and_resume_continues_from_the_last_good_epoch(store_dir, tmp_path, run):
    out, fit = tmp_path / "run", dataclasses.replace(FIT, epochs=3)
    optim = OPTIM if run is train else PretrainConfig(lr=1e-3)
    spoil = SpoilAt(out, 1, nan_weights)
    threads = torch.get_num_threads()
    with pytest.raises(GenreclfError) as err:
        run(store_dir, out, fit, optim, progress=False, callbacks=[spoil])
    assert torch.get_num_threads() == threads  # the fit's CPU settings (genreclf.lightning_modules.cpu_fit) undone
    text = message(err)
    assert text.startswith("training loss is nan in epoch 2, batch 1 of 4: ")
    assert "training diverged" in text and f"the weights of epoch 1 are kept in {out}/checkpoints/last.ckpt" in text
    assert text.endswith("; --resume with a lower --set-lr")
    assert sorted(spoil.saved) == ["best.ckpt", "last.ckpt"]
    assert files(out / "checkpoints") == spoil.saved  # epoch 1's checkpoints, untouched
    assert not (out / "model.safetensors").exists() and not (out / "encoder.safetensors").exists()

    logged = (out / "logs" / "metrics.csv").read_text()
    result = run(store_dir, out, fit, optim, resume=True, progress=False)
    assert result.epochs == 3 and result.model_path.exists()
    assert (out / "logs" / "metrics.csv").read_text().startswith(logged)  # epoch 1 as it was, then 2 and 3
    # ... and it ends where the run would have ended without the NaN: it went on from epoch 1's checkpoint
    run(store_dir, tmp_path / "whole", fit, optim, progress=False)
    resumed, whole = (weights(d / "checkpoints" / "last.ckpt") for d in (out, tmp_path / "whole"))
    assert resumed.keys() == whole.keys()
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=0, atol=1e-6, msg=k)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_nan_features_stop_training_before_the_step_and_name_the_track(store_copy, tmp_path):
    out = tmp_path / "run"
    watch = SpoilAt(out, 1, lambda module: write_nan_features(store_copy, "training", FIT.split, FIT.seed))
    with pytest.raises(GenreclfError) as err:
        train(store_copy, out, FIT, OPTIM, progress=False, callbacks=[watch])
    text = message(err)
    assert text.startswith("training loss is nan in epoch 2, batch ")
    assert f"the features of track {watch.spoiled} in {store_copy} hold NaN or inf" in text
    assert text.endswith("re-featurize the store, then --resume")
    assert watch.finite  # stopped before the optimiser applied the NaN gradients
    assert files(out / "checkpoints") == watch.saved and not (out / "model.safetensors").exists()


def test_a_nan_validation_loss_stops_before_the_epoch_is_saved(store_copy, tmp_path):
    out = tmp_path / "run"
    watch = SpoilAt(out, 1, lambda module: write_nan_features(store_copy, "validation", FIT.split, FIT.seed))
    # With early stopping, which alone would end the run at the NaN and export the best epoch as if all were well
    fit = dataclasses.replace(FIT, early_stopping=3)
    with pytest.raises(GenreclfError) as err:
        train(store_copy, out, fit, OPTIM, progress=False, callbacks=[watch])
    text = message(err)
    assert text.startswith(f"validation loss is nan after epoch 2: the features of track {watch.spoiled} ")
    assert f"the weights of epoch 1 are kept in {out}/checkpoints/last.ckpt" in text
    assert files(out / "checkpoints") == watch.saved and not (out / "model.safetensors").exists()
    assert [int(line.split(",")[0]) for line in (out / "logs" / "metrics.csv").read_text().splitlines()[1:]] == [0]


def test_nan_features_in_the_first_epoch_say_nothing_was_saved(store_copy, tmp_path):
    write_nan_features(store_copy, "training", FIT.split, FIT.seed)
    with pytest.raises(GenreclfError) as err:
        train(store_copy, tmp_path / "run", FIT, OPTIM, progress=False)
    text = message(err)
    assert "in epoch 1, batch " in text and "no epoch has finished, so none is saved" in text
    assert text.endswith("re-featurize the store, then train again")
    assert files(tmp_path / "run" / "checkpoints") == {}


def test_a_nan_loss_with_finite_gradients_still_stops_the_step():
    # Pretraining's l1 loss at a masked frame whose features are NaN: sign(NaN) is 0, the gradients finite
    target = torch.tensor([math.nan, 1.0, 2.0])
    plain = torch.zeros(3, requires_grad=True)
    F.l1_loss(plain, target).backward()
    assert torch.isfinite(plain.grad).all()
    watched = torch.zeros(3, requires_grad=True)
    loss = F.l1_loss(watched, target)
    StopOnNonFinite(Path("last.ckpt")).on_before_backward(None, None, loss)
    loss.backward()
    assert torch.isnan(watched.grad).all()  # what on_before_optimizer_step looks at, and DDP all-reduces
