"""Training runs on the fixture store: the crops each epoch draws, resume, metrics.csv, what a run leaves behind."""

from __future__ import annotations

from genreclf.train import FitConfig, _trainer


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
