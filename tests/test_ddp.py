"""DDP on the CPU: 2 processes launched by torchrun (gloo), as on a multi-GPU machine or a SLURM cluster.

A run trains, writes its folder once and resumes; with dropout off, 2 processes sharing each global batch
end with the weights and losses of 1 process running the same batches.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import write_nan_features

from genreclf.config import FitConfig, PretrainConfig, TrainConfig
from genreclf.datamodule import refuse_together
from genreclf.errors import GenreclfError
from genreclf.lightning_modules import PretrainModule, TaggerModule
from genreclf.models import GRUConfig, TransformerConfig
from genreclf.train import train

# 26 training tracks (4 batches of 8: 2 x 4 per process, the last 2 x 1), 1 validation track (the second
# process's share of it is a padding duplicate, not counted); short crops for speed.
FIT = FitConfig(model="gru", epochs=2, batch_size=8, min_crop=32, max_crop=100, seed=3, workers=0, accelerator="cpu")
OPTIM = TrainConfig(lr=1e-3)
NO_DROPOUT = GRUConfig(n_genres=163, pool_dropout=0.0)  # the only randomness left is the data order, shared

# The 2-process side of the comparison: genreclf.train.train with a model config, under torchrun.
SCRIPT = """
import json, sys
from genreclf.config import FitConfig, TrainConfig
from genreclf.models import GRUConfig
from genreclf.train import train

store, out, fit, optim, model = sys.argv[1:]
fit, optim, model = FitConfig(**json.loads(fit)), TrainConfig(**json.loads(optim)), GRUConfig(**json.loads(model))
train(store, out, fit, optim, progress=False, model_config=model)
"""

# The same with NaN features in the store: each process writes the error it stopped with to ERRORS/RANK.
SCRIPT_NAN = """
import json, os, sys
from pathlib import Path
from genreclf.config import FitConfig, TrainConfig
from genreclf.errors import GenreclfError
from genreclf.train import train

store, out, errors, fit = sys.argv[1:]
try:
    train(store, out, FitConfig(**json.loads(fit)), TrainConfig(lr=1e-3), progress=False)
except GenreclfError as e:
    Path(errors, os.environ["RANK"]).write_text(str(e))
"""


# Process 0 alone refuses (as when its GPU is short of memory): each process writes what it raised to ERRORS/RANK.
SCRIPT_REFUSE = """
import os, sys
from pathlib import Path
import torch
from genreclf.datamodule import refuse_together
from genreclf.errors import GenreclfError

torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
try:
    refuse_together(GenreclfError("no room on this GPU") if rank == 0 else None, torch.device("cpu"))
except GenreclfError as e:
    Path(sys.argv[1], str(rank)).write_text(str(e))
torch.distributed.destroy_process_group()
"""


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """Run `args` in 2 processes of 1 thread each under torchrun (a free local port), failing with its output."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 processes on 2 cores
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def epochs(run: Path) -> list[dict[str, float]]:
    with open(run / "logs" / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def test_torchrun_trains_writes_the_run_once_and_resumes(store_dir, tmp_path):
    run = tmp_path / "run"
    cli = ["-m", "genreclf", "train", "--model", "gru", "--store", str(store_dir), "--out", str(run)]
    cli += ["--batch-size", "8", "--min-crop", "32", "--max-crop", "100", "--workers", "0", "--lr", "1e-3"]
    cli += ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--quiet"]
    done = torchrun(*cli, "--epochs", "1")
    assert done.stdout.count("model written to") == 1  # said once, by the process that wrote it
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints",
        "logs",
        "model.safetensors",
        "settings.json",
        "train.json",
    ]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert json.loads((run / "train.json").read_text())["processes"] == 2
    first = epochs(run)
    assert [r["epoch"] for r in first] == [0] and first[0]["val_loss"] > 0

    torchrun(*cli, "--epochs", "3", "--resume")
    assert not [p for p in run.rglob(".*")]  # no temporary files left by either process
    again = epochs(run)
    assert [r["epoch"] for r in again] == [0, 1, 2] and again[0] == first[0]  # epoch 0 kept, 1 and 2 trained
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2
    assert json.loads((run / "train.json").read_text())["epochs"] == 3


def test_two_processes_sharing_each_batch_train_as_one(store_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each DDP process: 2 threads sum in another order (and crawl on a busy 2-core CPU)
    try:
        train(store_dir, one, FIT, OPTIM, progress=False, model_config=NO_DROPOUT)
    finally:
        torch.set_num_threads(threads)
    ddp = dataclasses.replace(FIT, devices="2", strategy="ddp")
    as_json = [json.dumps(dataclasses.asdict(c)) for c in (ddp, OPTIM, NO_DROPOUT)]
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    torchrun(str(script), str(store_dir), str(two), *as_json)

    # 8 Adam steps from the same start on the same crops: only the order of float sums differs (~1e-7 a step,
    # but Adam's eps of 1e-7 turns a rounding difference d in a near-zero gradient into up to lr x d / eps in the
    # weight: 1.0e-6 at most here, in 1 weight of 768,595; the weights moved by up to 8e-3)
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    L.seed_everything(FIT.seed, verbose=False)  # as train() does before building the model
    start = TaggerModule(NO_DROPOUT, OPTIM).state_dict()
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert diff < 1e-5 and moved > 1e-3, (diff, moved)
    # The losses are the 1-process means over all clips: val_loss counts the single validation clip once
    for x, y in zip(epochs(one), epochs(two), strict=True):
        for key in ("train_loss", "val_loss"):
            assert abs(x[key] - y[key]) <= 1e-5 * abs(x[key]), (key, x[key], y[key])
    # a run resumes with the model config it started with, not the default one
    with pytest.raises(GenreclfError, match="was started with GRUConfig.*pool_dropout=0.0"):
        train(store_dir, two, dataclasses.replace(FIT, epochs=3), OPTIM, resume=True, progress=False)


def test_a_nan_loss_on_one_process_stops_every_process_at_the_same_step(store_dir, tmp_path):
    store, errors, script = tmp_path / "store", tmp_path / "errors", tmp_path / "ddp_nan.py"
    shutil.copytree(store_dir, store)
    track = write_nan_features(store, "training", FIT.split, FIT.seed)  # in one process's share of its batch
    errors.mkdir()
    script.write_text(SCRIPT_NAN)
    fit = json.dumps(dataclasses.asdict(dataclasses.replace(FIT, devices="2", strategy="ddp")))
    torchrun(str(script), str(store), str(tmp_path / "run"), str(errors), fit)  # neither hangs nor crashes
    said = sorted(p.read_text() for p in errors.iterdir())
    assert len(said) == 2, said
    where = {text.split(":")[0].split(" in ")[1] for text in said}  # "epoch 1, batch k of 4"
    assert len(where) == 1 and said[0].startswith("training gradients are not finite in epoch 1, ")
    assert said[1].startswith("training loss is nan in epoch 1, ")  # the process whose share holds the track
    assert all(f"the features of track {track} in {store} hold NaN or inf" in text for text in said)
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "module",
    [
        TaggerModule(GRUConfig(n_genres=5)),
        TaggerModule(TransformerConfig(n_genres=5)),
        PretrainModule(TransformerConfig(n_genres=5), PretrainConfig(masking="span")),
        PretrainModule(TransformerConfig(n_genres=5), PretrainConfig(masking="reference")),
    ],
    ids=["gru", "transformer", "pretrain-span", "pretrain-reference"],
)
def test_every_trainable_parameter_gets_a_gradient(module):
    # DDP waits for the gradient of every trainable parameter: one left out stops a run at its second step
    x = torch.randn(3, 40, 128)
    batch = {"x": x, "lengths": torch.tensor([40, 30, 12]), "y": torch.randint(0, 2, (3, 5)).float()}
    loss = module.masked_loss(x, batch["lengths"]) if isinstance(module, PretrainModule) else module._loss(batch)
    loss.backward()
    assert [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None] == []


def test_a_refusal_in_one_process_stops_every_process(tmp_path):
    errors = tmp_path / "errors"
    errors.mkdir()
    script = tmp_path / "refuse.py"
    script.write_text(SCRIPT_REFUSE)
    torchrun(str(script), str(errors))  # both return: neither waits for the other
    said = {p.name: p.read_text() for p in errors.iterdir()}
    assert said == {
        "0": "no room on this GPU",
        "1": "another process of this run refused its --cache (its error says why); nothing was trained",
    }
    refuse_together(None, torch.device("cpu"))  # one process, nothing to refuse: goes on
    with pytest.raises(GenreclfError, match="^no room$"):
        refuse_together(GenreclfError("no room"), torch.device("cpu"))
