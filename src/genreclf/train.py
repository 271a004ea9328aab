"""Training runs: supervised tagging and masked-frame pretraining, with PyTorch Lightning.

A run folder holds everything a run made:

    RUN/model.safetensors       the best model by validation loss (never chosen on the test split), with
                                per-genre decision thresholds chosen on the validation split
    RUN/train.json              what was trained on what, parameters, epochs, losses, time
    RUN/settings.json           the settings a resume must repeat (split, seed, crops, optimiser and loss, store)
    RUN/logs/metrics.csv        train_loss, val_loss and lr per epoch (TensorBoard too, if installed)
    RUN/checkpoints/last.ckpt   for `--resume` after an interruption; best.ckpt
                                (a NaN or inf loss stops the run before it reaches either: genreclf.nonfinite)

Under DDP (torchrun or srun launch one process per device; Lightning reads their environment) every
process runs `train` and shares each batch (genreclf.data); process 0 alone writes the run folder.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import pickle
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from genreclf import __version__
from genreclf.atomic import atomic_write_text
from genreclf.calibrate import describe, validation_thresholds
from genreclf.config import FitConfig, PretrainConfig, TrainConfig
from genreclf.data import CropBatchSampler, EvenCropSampler, split_positions
from genreclf.datamodule import RunData, check_cache
from genreclf.errors import GenreclfError, first_line
from genreclf.lightning_modules import PretrainModule, TaggerModule, cpu_fit
from genreclf.modelfile import ModelFile, save_tensors
from genreclf.models import GRUConfig, ModelConfig, TransformerConfig, config_from_dict, count_parameters
from genreclf.nonfinite import NonFiniteLoss, StopOnNonFinite
from genreclf.progress import hms
from genreclf.provenance import git_revision
from genreclf.store import FeatureStore

log = logging.getLogger(__name__)

MODELS = {"gru": GRUConfig, "transformer": TransformerConfig}


@dataclass(frozen=True)
class RunResult:
    """What a training run produced."""

    run_dir: Path
    model_path: Path  # model.safetensors (or encoder.safetensors for pretraining)
    parameters: int
    epochs: int  # epochs completed
    best_val_loss: float
    seconds: float
    reporter: bool = True  # False on the DDP processes other than rank 0: the one that writes and reports


class EpochLog(Callback):
    """Seeds each epoch's dropout, appends one row per epoch to RUN/logs/metrics.csv, logs the ETA.

    Our own log rather than Lightning's CSVLogger, which deletes the file of an interrupted
    run when it is resumed: here the learning curve survives any number of resumes.
    """

    COLUMNS = ("epoch", "train_loss", "val_loss", "lr", "epoch_seconds")

    def __init__(self, max_epochs: int, path: Path, seed: int = 0):
        self.max_epochs, self.path, self.seed = max_epochs, path, seed
        self.t0 = self.t_epoch = time.monotonic()
        self.first_epoch = 0

    def on_train_start(self, trainer, module) -> None:
        self.t0, self.first_epoch = time.monotonic(), trainer.current_epoch
        if not trainer.is_global_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.path.exists():  # a resumed run: keep the epochs before the checkpoint
            with open(self.path, newline="") as f:
                kept = [r for r in csv.DictReader(f) if int(r["epoch"]) < trainer.current_epoch]
        lines = [",".join(self.COLUMNS)] + [",".join(r.get(c, "") for c in self.COLUMNS) for r in kept]
        atomic_write_text(self.path, "\n".join(lines) + "\n")

    def on_train_epoch_start(self, trainer, module) -> None:
        self.t_epoch = time.monotonic()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        # Resumed runs draw the same dropout and pretraining masks too (Lightning does not restore
        # torch's RNG). Seeded here, after the epoch's DataLoader iterator has drawn its own seed.
        if batch_idx == 0:
            torch.manual_seed(hash((self.seed, trainer.current_epoch, trainer.global_rank)) % 2**63)

    def on_train_epoch_end(self, trainer, module) -> None:
        m = trainer.callback_metrics  # read by every DDP process: reading it sums train_loss across them
        values = {
            "epoch": trainer.current_epoch,
            "train_loss": float(m.get("train_loss", float("nan"))),
            "val_loss": float(m.get("val_loss", float("nan"))),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "epoch_seconds": round(time.monotonic() - self.t_epoch, 2),
        }
        if not trainer.is_global_zero:  # the same values on every process: one writes and reports them
            return
        with open(self.path, "a") as f:
            f.write(",".join(str(values[c]) for c in self.COLUMNS) + "\n")
        done = trainer.current_epoch + 1
        elapsed = time.monotonic() - self.t0
        per_epoch = elapsed / max(1, done - self.first_epoch)
        log.info(
            "epoch %d/%d  train_loss %.4f  val_loss %.4f  (%.0f s/epoch, %s elapsed, ETA %s at most)",
            done,
            self.max_epochs,
            values["train_loss"],
            values["val_loss"],
            per_epoch,
            hms(elapsed),
            hms(per_epoch * (self.max_epochs - done)),
        )


@dataclass
class _Run:
    """A checked run, ready to fit: what `_prepare` returns."""

    store: FeatureStore
    run_dir: Path
    ckpt: Path | None  # last.ckpt to resume from
    trainer: L.Trainer
    data: RunData  # the training and validation loaders, and the cache
    counts: tuple[int, int]  # training and validation tracks
    model_config: ModelConfig


def _prepare(
    store_path: str | Path,
    run_dir: str | Path,
    fit: FitConfig,
    optim: TrainConfig | PretrainConfig,
    resume: bool,
    progress: bool,
    callbacks: Sequence[Callback],
    model_config: ModelConfig | None,
) -> _Run:
    store = FeatureStore.open(store_path)
    run_dir = Path(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    if resume and not last.exists():
        raise GenreclfError(f"{run_dir}: nothing to resume (no checkpoints/last.ckpt); train without --resume")
    if not resume and (last.exists() or (run_dir / "model.safetensors").exists()):
        raise GenreclfError(f"{run_dir} already holds a run; add --resume to continue it or pick a new --out")
    if fit.model not in MODELS:
        raise GenreclfError(f"unknown model {fit.model!r}; use one of {', '.join(MODELS)}")
    model_config = model_config or MODELS[fit.model](n_genres=len(store.genres))
    if model_config.kind != fit.model or model_config.n_genres != len(store.genres):
        raise GenreclfError(
            f"the model config is for {model_config.kind!r} on {model_config.n_genres} genres, not {fit.model!r} "
            f"on the store's {len(store.genres)}"
        )
    if fit.set_lr is not None and not resume:
        raise GenreclfError("--set-lr changes the learning rate of a resumed run (with --resume); a new run takes --lr")
    next_epoch = _check_resumable(last, model_config) if resume else 0
    if fit.epochs < 1 or fit.batch_size < 1:
        raise GenreclfError("epochs and batch size must be at least 1")
    if fit.set_lr is not None:
        callbacks = [*callbacks, SetLearningRate(fit.set_lr)]
    with _quiet_lightning():
        trainer = _trainer(run_dir, fit, progress, callbacks)  # knows this process's rank and the world size
    rank, world = trainer.global_rank, trainer.world_size
    device = trainer.strategy.root_device
    check_cache(store, fit.cache, device, trainer.num_devices)  # before anything is written
    defaults = _setting_defaults(optim)
    _check_settings(run_dir, _settings(store, fit, optim), resume, write=trainer.is_global_zero, defaults=defaults)
    L.seed_everything(fit.seed, workers=True, verbose=False)
    train_pos = split_positions(store, "training", fit.split, fit.seed)
    val_pos = split_positions(store, "validation", fit.split, fit.seed)
    # A resumed run draws the crops the uninterrupted run would have drawn from next_epoch on, on any
    # number of processes: batch_size is the global batch, of which each process takes its share.
    sampler = CropBatchSampler(
        store.valid_frames,
        train_pos,
        fit.batch_size,
        fit.min_crop,
        fit.max_crop,
        fit.seed,
        rank=rank,
        world_size=world,
        first_epoch=next_epoch,
    )
    val_sampler = EvenCropSampler(store.valid_frames, val_pos, fit.batch_size, fit.val_crop, rank, world)
    workers = fit.workers if fit.workers is not None else int(device.type != "cpu")
    data = RunData(store, sampler, val_sampler, workers, fit.cache, pin_memory=device.type == "cuda")
    if trainer.is_global_zero:
        log.info(
            "features %s; precision %s",
            {"none": "memory-mapped", "ram": "read into memory", "gpu": f"held on {device}"}[fit.cache],
            trainer.precision,
        )
        if fit.cache == "gpu" and fit.workers:
            log.info("--cache gpu: index batches are made in the training process, --workers %d unused", workers)
    counts = len(train_pos), len(val_pos)
    return _Run(store, run_dir, last if resume else None, trainer, data, counts, model_config)


class SetLearningRate(Callback):
    """Sets every parameter group's learning rate once a resumed fit has restored its optimiser (--set-lr)."""

    def __init__(self, lr: float):
        self.lr = lr

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        groups = [group for optimizer in trainer.optimizers for group in optimizer.param_groups]
        was = min(group["lr"] for group in groups)
        for group in groups:
            group["lr"] = self.lr
        if trainer.is_global_zero:
            log.info("learning rate set to %g from epoch %d on (it was %g)", self.lr, trainer.current_epoch + 1, was)


def _check_resumable(last: Path, model_config: ModelConfig) -> int:
    """Refuse to resume a run with another model, model config or genre vocabulary; return the epoch to resume at."""
    try:  # weights_only: tensors and plain values only, as unpickling anything else can run code
        checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise GenreclfError(
            f"{last} holds objects other than tensors and plain values (loading them could run "
            "code; genreclf's checkpoints hold none); not resuming it: pick a new --out"
        ) from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise GenreclfError(f"{last}: cannot read the checkpoint ({first_line(e, 80)}); pick a new --out") from None
    config = checkpoint.get("hyper_parameters", {}).get("model_config", {})
    kind, n_genres = model_config.kind, model_config.n_genres
    if config.get("kind") != kind or config.get("n_genres") != n_genres:
        raise GenreclfError(
            f"{last.parent.parent} was started with model {config.get('kind')!r} on {config.get('n_genres')} genres, "
            f"not {kind!r} on {n_genres}; resume with the same --model and --store, or pick a new --out"
        )
    started = config_from_dict(config)  # keys added since the run started take their defaults
    if started != model_config:
        raise GenreclfError(
            f"{last.parent.parent} was started with {started}, not {model_config}; "
            "resume with the same model config, or pick a new --out"
        )
    return int(checkpoint.get("epoch", -1)) + 1  # checkpoints are written at the end of an epoch


# May change on --resume. The processes (devices x num_nodes) may: batch_size is the global batch, the same
# batches whatever their number (genreclf.data), and batch_size itself may not change. Every cache reads the
# same batches; precision, like the accelerator, changes the arithmetic only.
RESUMABLE = (
    "epochs",
    "workers",
    "early_stopping",
    "accelerator",
    "devices",
    "num_nodes",
    "strategy",
    "cache",
    "precision",
    "set_lr",
)


def _settings(store: FeatureStore, fit: FitConfig, optim: TrainConfig | PretrainConfig) -> dict:
    """What defines a run's training: the same on every resume, or its epochs would mix data or objectives."""
    digest = hashlib.sha1(np.ascontiguousarray(store.track_ids, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(store.genre_ids, dtype=np.int64).tobytes())
    settings = {
        **{k: v for k, v in dataclasses.asdict(fit).items() if k not in RESUMABLE},
        "optimiser": dataclasses.asdict(optim),
        "labels": store.header.labels,
        "subset": store.header.subset,
        "store_tracks": len(store.track_ids),
        "store_digest": digest.hexdigest(),
    }
    return json.loads(json.dumps(settings, default=str))  # as it reads back from settings.json (tuples -> lists)


def _setting_defaults(optim: TrainConfig | PretrainConfig) -> dict:
    """The defaults of the dict-valued settings, for runs started before some of their fields existed."""
    return {"optimiser": dataclasses.asdict(type(optim)())}


def _check_settings(
    run_dir: Path, settings: dict, resume: bool, write: bool = True, defaults: dict | None = None
) -> None:
    """Write RUN/settings.json when a run starts (if `write`: DDP process 0); on --resume, refuse other settings.

    `defaults` {key: {field: default}} completes a dict-valued setting of a run started before the field
    existed (its default is what that genreclf did: "loss" added to "optimiser" defaults to "bce").
    """
    path = run_dir / "settings.json"
    if resume and not path.is_file():
        raise GenreclfError(
            f"{run_dir} was started by an older genreclf (no settings.json; its loss is on "
            "another scale); start a new --out"
        )
    if resume:
        started = json.loads(path.read_text())
        for key, fields in (defaults or {}).items():
            if isinstance(started.get(key), dict):
                started[key] = {**fields, **started[key]}
        changed = _changed(started, settings)
        if changed:
            was = ", ".join(f"{k}={v!r}" for k, (v, _) in changed.items() if k != "store_digest")
            now = ", ".join(f"{k}={v!r}" for k, (_, v) in changed.items() if k != "store_digest")
            what = "another store's tracks" if list(changed) == ["store_digest"] else f"{was} (now {now})"
            raise GenreclfError(
                f"{run_dir} was started with {what}; resume with the same settings and store, or pick a new --out"
            )
        return
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(settings, indent=1, default=str))


def _changed(started: dict, now: dict, prefix: str = "") -> dict[str, tuple]:
    """Return {key: (started, now)} of the settings that differ; "optimiser.loss" for a field of a dict setting."""
    changed: dict[str, tuple] = {}
    for k in sorted(set(started) | set(now)):
        was, new = started.get(k), now.get(k)
        if isinstance(was, dict) and isinstance(new, dict):
            changed.update(_changed(was, new, f"{prefix}{k}."))
        elif was != new:
            changed[f"{prefix}{k}"] = (was, new)
    return changed


def check_started_with(run_dir: str | Path, store_path: str | Path, fit: FitConfig, optim: TrainConfig) -> None:
    """Raise GenreclfError unless run_dir was started with these settings on this store (as --resume checks)."""
    settings, defaults = _settings(FeatureStore.open(store_path), fit, optim), _setting_defaults(optim)
    _check_settings(Path(run_dir), settings, resume=True, write=False, defaults=defaults)


def _trainer(run_dir: Path, fit: FitConfig, progress: bool, extra: Sequence[Callback] = ()) -> L.Trainer:
    """Return a run's Lightning trainer: best and last checkpoints, EpochLog, a bar on a terminal only."""
    loggers: list = []
    try:
        import tensorboard  # noqa: F401

        loggers.append(L.pytorch.loggers.TensorBoardLogger(run_dir, name="", version="logs"))
    except ImportError:
        pass
    callbacks: list = [
        # The best epoch by validation loss (checkpoint_callback, exported as model.safetensors) ...
        ModelCheckpoint(
            run_dir / "checkpoints", filename="best", monitor="val_loss", mode="min", enable_version_counter=False
        ),
        # ... and every epoch's state for --resume (save_last alone only writes when "best" improves).
        ModelCheckpoint(
            run_dir / "checkpoints",
            filename="last",
            monitor=None,
            save_top_k=1,
            every_n_epochs=1,
            enable_version_counter=False,
        ),
        EpochLog(fit.epochs, run_dir / "logs" / "metrics.csv", fit.seed),
        # Stops at a NaN or inf loss before the step or the epoch's checkpoints (Lightning calls those last).
        StopOnNonFinite(run_dir / "checkpoints" / "last.ckpt"),
        *extra,
    ]
    if fit.early_stopping:
        callbacks.append(EarlyStopping("val_loss", patience=fit.early_stopping, mode="min"))
    # Lightning draws its bar on stdout; in a log file that is thousands of \r-separated refreshes,
    # so off a terminal EpochLog's one line per epoch is the progress report.
    bar = progress and sys.stdout is not None and sys.stdout.isatty()
    if bar:
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    try:
        return L.Trainer(
            default_root_dir=run_dir,
            max_epochs=fit.epochs,
            accelerator=fit.accelerator,
            devices=fit.devices,
            num_nodes=fit.num_nodes,
            strategy=fit.strategy,
            precision=_precision(fit),
            logger=loggers or False,
            callbacks=callbacks,
            enable_progress_bar=bar,
            enable_model_summary=False,
            deterministic=False,
            num_sanity_val_steps=0,
            log_every_n_steps=10,
            use_distributed_sampler=False,  # CropBatchSampler and EvenCropSampler share batches across DDP ranks
        )
    except (MisconfigurationException, TypeError, ValueError, RuntimeError) as e:
        raise GenreclfError(
            f"cannot use --accelerator {fit.accelerator} --devices {fit.devices} --num-nodes {fit.num_nodes} "
            f"--strategy {fit.strategy} --precision {fit.precision}: {first_line(e, None)}"
        ) from None


def _precision(fit: FitConfig) -> str:
    """Return the Lightning precision of fit.precision: "auto" is bf16-mixed on a bfloat16 CUDA GPU, else 32."""
    if fit.precision != "auto":
        return fit.precision
    cuda = fit.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    # Native bfloat16 only (Ampere and later): emulated, it is slower than float32. This reads the device's
    # properties without allocating on it.
    return "bf16-mixed" if cuda and torch.cuda.is_bf16_supported(including_emulation=False) else "32"


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's advice that does not apply to our runs, for the length of a run only."""
    logger, fabric = logging.getLogger("lightning.pytorch"), logging.getLogger("lightning.fabric")
    level = logger.level
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning 2.6 vs torch 2.13, not ours
        warnings.filterwarnings("ignore", ".*number of training batches.*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", ".*Checkpoint directory .* exists and is not empty.*")  # --resume
        # val_loss is summed over DDP processes by the module, lr is the same on each
        warnings.filterwarnings("ignore", ".*recommended to use `self.log.*sync_dist=True.*")
        fabric_level = fabric.level
        logger.setLevel(logging.WARNING)
        fabric.setLevel(logging.WARNING)  # "Initializing distributed: ..." from every process
        try:
            yield
        finally:
            logger.setLevel(level)
            fabric.setLevel(fabric_level)


def _fit(run: _Run, module: L.LightningModule) -> L.LightningModule:
    """Run Lightning's fit; return the best epoch's module (by val_loss) on process 0, `module` on the others."""
    grouped = _process_group()  # one the caller made before: theirs to end
    try:
        cpu = run.trainer.strategy.root_device.type == "cpu"
        with _quiet_lightning(), cpu_fit(module) if cpu else contextlib.nullcontext():
            # weights_only: our checkpoints hold plain values and tensors; anything else could run code.
            run.trainer.fit(module, datamodule=run.data, ckpt_path=run.ckpt, weights_only=True)
            best_path = run.trainer.checkpoint_callback.best_model_path
            if best_path and run.trainer.is_global_zero:  # the others write nothing, so need no best model
                module = type(module).load_from_checkpoint(best_path, map_location="cpu", weights_only=True)
    except NonFiniteLoss:  # raised by every process at the same step: they end the group together too
        _end_process_group(grouped)
        raise
    _end_process_group(grouped)
    return module


def _end_process_group(grouped: bool) -> None:
    if not grouped and _process_group():
        # Lightning's DDP process group, ended by all the processes together once the fit is over: left to the
        # interpreter's exit, gloo's threads now and then aborted a process ("terminate called without an
        # active exception", seen once in a test run of 2 processes).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _process_group() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _provenance(store: FeatureStore, fit: FitConfig, counts: tuple[int, int], extra: dict) -> dict:
    return {
        "store": str(store.path.resolve()),
        "store_description": store.describe(),
        "labels": store.header.labels,
        "subset": store.header.subset,
        "split": fit.split,
        "train_tracks": counts[0],
        "validation_tracks": counts[1],
        "fit": dataclasses.asdict(fit),
        "genreclf": __version__,
        "git": git_revision(),
        "torch": torch.__version__,
        # CPU training results depend on the vector kernels torch picks (AVX2 vs AVX512): see README.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        **extra,
    }


def train(
    store_path: str | Path,
    run_dir: str | Path,
    fit: FitConfig = FitConfig(),
    optim: TrainConfig = TrainConfig(),
    resume: bool = False,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
    model_config: ModelConfig | None = None,
) -> RunResult:
    """Train a GRU or Transformer tagger on the store's training split; return the run's result.

    The best epoch by validation loss becomes RUN/model.safetensors, with per-genre decision thresholds
    chosen on the validation split (genreclf.calibrate). `callbacks` are extra
    Lightning callbacks (to watch a run); the progress bar is shown on a terminal only. `model_config`
    (a GRUConfig or TransformerConfig for fit.model on the store's genres) replaces the default dimensions
    and dropout; a resumed run must repeat it. Under DDP every process calls `train`; process 0 writes the run.
    """
    t0 = time.perf_counter()
    run = _prepare(store_path, run_dir, fit, optim, resume, progress, callbacks, model_config)
    store, trainer, model_cfg = run.store, run.trainer, run.model_config
    module = TaggerModule(model_cfg, optim)
    if fit.pretrained:
        if fit.model != "transformer":
            raise GenreclfError("--pretrained encoder weights are for the transformer model only")
        module.model.load_encoder_state_dict(_load_tensors(fit.pretrained))
    params = count_parameters(module.model)
    if trainer.is_global_zero:
        log.info(
            "training %s (%s parameters, %s loss) on %d tracks, validating on %d (%s split; %d process%s) -> %s",
            fit.model,
            f"{params:,}",
            optim.loss,
            run.counts[0],
            run.counts[1],
            fit.split,
            trainer.world_size,
            "" if trainer.world_size == 1 else "es",
            run.run_dir,
        )
    best = _fit(run, module)
    best_val = float(trainer.checkpoint_callback.best_model_score or float("nan"))
    seconds = time.perf_counter() - t0
    model_path = run.run_dir / "model.safetensors"
    if not trainer.is_global_zero:  # under DDP one process writes the run's files
        return RunResult(run.run_dir, model_path, params, trainer.current_epoch, best_val, seconds, False)
    extra = {
        "parameters": params,
        "epochs": trainer.current_epoch,
        "best_val_loss": best_val,
        "train_config": dataclasses.asdict(optim),
        "train_seconds": seconds,
        "processes": trainer.world_size,
        "precision": trainer.precision,  # what ran ("32-true", "bf16-mixed"): fit.precision "auto" resolved
    }
    thresholds = _thresholds(best.model, store, fit, progress)
    model_path = ModelFile(
        model=best.model,
        config=model_cfg,
        genres=store.genres,
        genre_ids=list(store.genre_ids),
        signal=store.signal,
        genre_top_level=list(store.header.genre_top_level),
        provenance=_provenance(store, fit, run.counts, extra),
        genre_parents=list(store.header.genre_parents),
        thresholds=thresholds,
        loss=optim.loss_record(),
    ).save(model_path)
    atomic_write_text(run.run_dir / "train.json", json.dumps({"model": fit.model, **extra}, indent=1))
    return RunResult(run.run_dir, model_path, params, trainer.current_epoch, best_val, seconds)


def _thresholds(model: torch.nn.Module, store: FeatureStore, fit: FitConfig, progress: bool) -> dict:
    """Return the best model's per-genre decision thresholds, chosen on the run's validation split."""
    device = "cuda" if torch.cuda.is_available() and fit.accelerator != "cpu" else "cpu"
    was = next(model.parameters()).device
    try:
        record = validation_thresholds(model.to(device), store, fit.split, fit.seed, progress=progress)
    finally:
        model.to(was)
    log.info("decision thresholds: %s", describe(record))
    return record


def pretrain(
    store_path: str | Path,
    run_dir: str | Path,
    fit: FitConfig = FitConfig(model="transformer"),
    optim: PretrainConfig = PretrainConfig(),
    resume: bool = False,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
) -> RunResult:
    """Masked-frame pretraining of the Transformer encoder; writes RUN/encoder.safetensors."""
    t0 = time.perf_counter()
    fit = dataclasses.replace(fit, model="transformer")
    run = _prepare(store_path, run_dir, fit, optim, resume, progress, callbacks, None)
    module = PretrainModule(run.model_config, optim)
    best = _fit(run, module)
    out = run.run_dir / "encoder.safetensors"
    trainer = run.trainer
    best_val = float(trainer.checkpoint_callback.best_model_score or float("nan"))
    if trainer.is_global_zero:  # under DDP one process writes the run's files
        provenance = _provenance(
            run.store, fit, run.counts, {"processes": trainer.world_size, "precision": trainer.precision}
        )
        save_tensors(
            out,
            best.encoder_state_dict(),
            {"format": "genreclf-encoder", "provenance": json.dumps(provenance, default=str)},
        )
    seconds = time.perf_counter() - t0
    params = count_parameters(best.encoder)
    return RunResult(run.run_dir, out, params, trainer.current_epoch, best_val, seconds, trainer.is_global_zero)


def _load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("format") != "genreclf-encoder":
                raise GenreclfError(f"{path}: not an encoder file from `genreclf pretrain`")
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError) as e:
        raise GenreclfError(f"{path}: cannot read pretrained encoder ({first_line(e, 80)})") from None
