"""Training runs on the fixture store: the crops each epoch draws, resume, metrics.csv, what a run leaves behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genreclf.errors import GenreclfError
from genreclf.lightning_modules import TrainConfig
from genreclf.train import FitConfig, _trainer, train

# early_stopping: its state is in the checkpoints too (it never stops runs this short)
FIT = FitConfig(model="gru", epochs=2, batch_size=8, seed=3, accelerator="cpu", early_stopping=5)
OPTIM = TrainConfig(lr=1e-3)


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


def test_default_is_one_device_even_on_a_multi_gpu_node(monkeypatch, tmp_path):
    # Lightning is told there are 4 GPUs (its CUDA probes, not ours, are replaced: no GPU is needed here).
    import lightning.fabric.accelerators.cuda as fabric_cuda
    from lightning.fabric.utilities import device_parser
    import lightning.pytorch.accelerators.cuda as pytorch_cuda

    for module in (fabric_cuda, pytorch_cuda, device_parser):
        for name, fake in (("num_cuda_devices", lambda: 4), ("is_cuda_available", lambda: True)):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, fake)
    assert _trainer(tmp_path, FitConfig(devices="auto"), None, progress=False).num_devices == 4  # the fake works
    trainer = _trainer(tmp_path, FitConfig(), None, progress=False)
    assert trainer.num_devices == 1 and type(trainer.strategy).__name__ == "SingleDeviceStrategy"
