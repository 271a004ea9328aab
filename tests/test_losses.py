"""The training losses: hand-computed values, limits, stability, and `genreclf train --loss` end to end."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from genreclf.cli import main
from genreclf.config import LOSS_PARAMETERS, LOSSES, TrainConfig
from genreclf.errors import GenreclfError
from genreclf.lightning_modules import TaggerModule
from genreclf.losses import asymmetric_loss, criterion, focal_loss, lsep_loss, weighted_bce
from genreclf.modelfile import ModelFile, save_tensors
from genreclf.models import GRUConfig

LOGITS = [[0.0, 2.0, -1.0, 0.5], [3.0, -2.0, -4.0, 1.0], [-0.3, 0.7, 1.5, -6.0]]
TARGETS = [[1, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0]]


def _tensors(dtype=torch.float32):
    return torch.tensor(LOGITS, dtype=dtype), torch.tensor(TARGETS, dtype=dtype)


def _sigmoid(z):
    return 1 / (1 + np.exp(-np.asarray(z, dtype=np.float64)))


def _focal_reference(z, y, gamma, alpha):
    """Lin et al.'s formula on probabilities, term by term."""
    p, y = _sigmoid(z), np.asarray(y, dtype=np.float64)
    p_t = np.where(y == 1, p, 1 - p)
    a_t = 1.0 if alpha is None else np.where(y == 1, alpha, 1 - alpha)
    return float((-a_t * (1 - p_t) ** gamma * np.log(p_t)).sum(-1).mean())


def _asl_reference(z, y, gamma_pos, gamma_neg, clip):
    """Ridnik et al.'s formula on probabilities, term by term."""
    p, y = _sigmoid(z), np.asarray(y, dtype=np.float64)
    p_m = np.maximum(p - clip, 0)
    pos = -((1 - p) ** gamma_pos) * np.log(p)
    neg = -(p_m**gamma_neg) * np.log(1 - p_m)
    return float(np.where(y == 1, pos, neg).sum(-1).mean())


def _lsep_reference(z, y):
    """Li et al.'s formula as written: a double loop over (negative, positive) pairs of each clip."""
    total = 0.0
    for f, labels in zip(z, y):
        pairs = [(v, u) for v, u in itertools.product(range(len(f)), repeat=2) if labels[v] == 0 and labels[u] == 1]
        total += math.log(1 + sum(math.exp(f[v] - f[u]) for v, u in pairs)) if pairs else 0.0
    return total / len(z)


def test_weighted_bce_matches_hand_computation():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 3.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # positive: -w*log(sigmoid(z)) = w*log(1+e^-z); negative: log(1+e^z)
    # Summed over the genres, averaged over the 2 clips (the reference's K.sum(..., axis=-1)).
    expected = (4 * math.log(2) + math.log(1 + math.e**2) + math.log(1 + math.e**-1) + 4 * math.log(1 + math.e**-3)) / 2
    assert weighted_bce(logits, targets, 4.0).item() == pytest.approx(expected, rel=1e-6)
    unweighted = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / 2
    torch.testing.assert_close(weighted_bce(logits, targets, 1.0), unweighted)
    # The default TrainConfig trains with exactly this loss.
    assert criterion(TrainConfig())(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_focal_loss_matches_hand_computation():
    one, pos = torch.zeros(1, 1), torch.ones(1, 1)
    # p = 1/2 on a positive: -alpha (1 - 1/2)^2 log(1/2) = 0.25 * 0.25 * ln 2
    assert focal_loss(one, pos).item() == pytest.approx(0.0625 * math.log(2), rel=1e-6)
    # a negative at logit 2: p = sigmoid(2); -(1 - alpha) p^2 log(1 - p)
    p = 1 / (1 + math.exp(-2))
    assert focal_loss(torch.full((1, 1), 2.0), torch.zeros(1, 1)).item() == pytest.approx(
        -0.75 * p**2 * math.log(1 - p), rel=1e-6
    )
    for dtype, rel in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        z, y = _tensors(dtype)
        for gamma, alpha in ((2.0, 0.25), (0.5, 0.6), (3.0, None)):
            got = focal_loss(z, y, gamma, alpha)
            assert got.dtype == dtype
            assert got.item() == pytest.approx(_focal_reference(LOGITS, TARGETS, gamma, alpha), rel=rel)


def test_asymmetric_loss_matches_hand_computation():
    # a negative at logit 0: p = 1/2, p_m = 0.45: -(0.45^4) log(0.55)
    assert asymmetric_loss(torch.zeros(1, 1), torch.zeros(1, 1)).item() == pytest.approx(
        -(0.45**4) * math.log(0.55), rel=1e-6
    )
    # a negative below the margin costs nothing: sigmoid(-4) = 0.018 < 0.05
    assert asymmetric_loss(torch.full((1, 1), -4.0), torch.zeros(1, 1)).item() == 0.0
    # a positive at logit 1 with gamma_pos 0: plain -log p
    assert asymmetric_loss(torch.ones(1, 1), torch.ones(1, 1)).item() == pytest.approx(math.log(1 + math.e**-1))
    for dtype, rel in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        z, y = _tensors(dtype)
        for params in ((0.0, 4.0, 0.05), (1.0, 0.5, 0.2), (2.0, 3.0, 0.0)):
            got = asymmetric_loss(z, y, *params)
            assert got.dtype == dtype
            assert got.item() == pytest.approx(_asl_reference(LOGITS, TARGETS, *params), rel=rel)


def test_lsep_loss_equals_the_double_loop_over_pairs():
    # one clip, positive at logit 1, negative at 0: log(1 + e^(0 - 1))
    assert lsep_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]])).item() == pytest.approx(
        math.log(1 + math.exp(-1)), rel=1e-6
    )
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (6, 9))
    y = (rng.random((6, 9)) < 0.3).astype(np.float64)
    y[0], y[1] = 0, 1  # no positive genre; no negative genre: no pairs, 0 (counted in the mean)
    y[2] = 0
    y[2, 4] = 1
    want = _lsep_reference(z, y)
    for dtype, rel in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        got = lsep_loss(torch.tensor(z, dtype=dtype), torch.tensor(y, dtype=dtype))
        assert got.dtype == dtype and got.item() == pytest.approx(want, rel=rel)
    # the clips without pairs contribute 0: the mean over the other 4 clips, times 4/6
    assert lsep_loss(torch.tensor(z[2:]), torch.tensor(y[2:])).item() * 4 / 6 == pytest.approx(want, rel=1e-12)


def test_focal_and_asymmetric_reduce_to_plain_bce():
    for dtype in (torch.float32, torch.float64):
        z, y = _tensors(dtype)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="sum") / len(z)
        torch.testing.assert_close(focal_loss(z, y, gamma=0.0, alpha=None), bce)
        torch.testing.assert_close(asymmetric_loss(z, y, gamma_pos=0.0, gamma_neg=0.0, clip=0.0), bce)
        torch.testing.assert_close(weighted_bce(z, y, 1.0), bce)
    # alpha = 1/2 is half of BCE: the weighting is there
    torch.testing.assert_close(focal_loss(z, y, gamma=0.0, alpha=0.5), bce / 2)


FUNCTIONS = {
    "bce": lambda z, y: weighted_bce(z, y, 4.0),
    "focal": focal_loss,
    "focal gamma 0.5": lambda z, y: focal_loss(z, y, gamma=0.5),
    "asymmetric": asymmetric_loss,
    "asymmetric gammas 0.5, clip 0": lambda z, y: asymmetric_loss(z, y, 0.5, 0.5, 0.0),
    "asymmetric gamma_neg 0.5": lambda z, y: asymmetric_loss(z, y, 0.0, 0.5, 0.05),
    "lsep": lsep_loss,
}


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_large_logits_give_finite_losses_and_gradients(name, dtype):
    # Every sign of logit with every label, and clips without positives or without negatives.
    z = torch.tensor([[50.0, -50.0, 50.0, -50.0], [50.0, 50.0, -50.0, -50.0], [-50.0, 50.0, 0.0, 3.0]], dtype=dtype)
    y = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=dtype)
    z.requires_grad_(True)
    # Anomaly detection raises on a NaN in any step of the backward pass, even one that a later where()
    # or clamp() would drop: 0 x inf where p_m^gamma_neg (gamma_neg < 1) meets p_m = 0, or an empty logsumexp.
    with torch.autograd.detect_anomaly(check_nan=True):
        loss = FUNCTIONS[name](z, y)
        loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all(), (loss, z.grad)


def test_large_logits_cost_what_they_should():
    # log(sigmoid(z)) or log(1 - sigmoid(z)) would be -inf here: 1 - sigmoid(50) is 0 in float32.
    neg, pos = torch.zeros(1, 1), torch.ones(1, 1)
    big = torch.full((1, 1), 50.0)
    assert weighted_bce(big, neg, 4.0).item() == pytest.approx(50.0)
    assert focal_loss(big, neg).item() == pytest.approx(0.75 * 50.0)
    assert focal_loss(-big, pos).item() == pytest.approx(0.25 * 50.0)
    assert asymmetric_loss(-big, pos).item() == pytest.approx(50.0)
    assert asymmetric_loss(big, neg).item() == pytest.approx(-(0.95**4) * math.log(0.05), rel=1e-5)
    assert asymmetric_loss(big, neg, clip=0.0).item() == pytest.approx(50.0)
    # a negative 100 above the positive: log(1 + e^100) = 100 (e^100 overflows float32)
    assert lsep_loss(torch.tensor([[-50.0, 50.0]]), torch.tensor([[1.0, 0.0]])).item() == pytest.approx(100.0)


def test_tagger_module_trains_with_the_loss_its_config_names():
    torch.manual_seed(0)
    cfg = GRUConfig(n_genres=5, hidden=16)
    batch = {"x": torch.randn(4, 20, 128), "y": (torch.rand(4, 5) < 0.4).float()}
    batch["y"][:, 0] = 1
    for train_config, function in (
        (TrainConfig(), lambda z, y: weighted_bce(z, y, 4.0)),
        (TrainConfig(pos_weight=2.0), lambda z, y: weighted_bce(z, y, 2.0)),
        (TrainConfig(loss="focal", focal_gamma=1.0, focal_alpha=None), lambda z, y: focal_loss(z, y, 1.0, None)),
        (TrainConfig(loss="asymmetric", asl_clip=0.1), lambda z, y: asymmetric_loss(z, y, 0.0, 4.0, 0.1)),
        ({"loss": "lsep"}, lsep_loss),
    ):
        module = TaggerModule(cfg, train_config).eval()
        with torch.no_grad():
            torch.testing.assert_close(module._loss(batch), function(module(batch["x"]), batch["y"]))


def test_train_config_refuses_bad_loss_parameters_in_one_line():
    for kwargs, message in (
        ({"loss": "hinge"}, "unknown loss 'hinge'; use one of bce, focal, asymmetric, lsep"),
        ({"loss": "focal", "focal_gamma": -1.0}, "focal_gamma must be a number >= 0"),
        ({"loss": "focal", "focal_gamma": math.inf}, "focal_gamma must be a number >= 0"),
        ({"loss": "focal", "focal_alpha": 1.0}, "focal_alpha must be in (0, 1) or None"),
        ({"loss": "focal", "focal_alpha": math.nan}, "focal_alpha must be in (0, 1) or None"),
        ({"loss": "asymmetric", "asl_gamma_neg": math.nan}, "asl_gamma_neg must be a number >= 0"),
        ({"loss": "asymmetric", "asl_gamma_pos": -0.5}, "asl_gamma_pos must be a number >= 0"),
        ({"loss": "asymmetric", "asl_clip": 1.0}, "asl_clip must be in [0, 1)"),
        ({"loss": "asymmetric", "asl_clip": -0.1}, "asl_clip must be in [0, 1)"),
        ({"focal_gamma": 1.0}, "focal_gamma=1.0 is a parameter of loss 'focal', not of 'bce'"),
        ({"loss": "lsep", "pos_weight": 2.0}, "pos_weight=2.0 is a parameter of loss 'bce', not of 'lsep'"),
        ({"loss": "focal", "asl_clip": 0.1}, "asl_clip=0.1 is a parameter of loss 'asymmetric', not of 'focal'"),
    ):
        with pytest.raises(GenreclfError) as err:
            TrainConfig(**kwargs)
        assert message in str(err.value) and "\n" not in str(err.value), kwargs
    # every loss with each of its own parameters changed is fine
    assert TrainConfig(loss="focal", focal_gamma=0.0, focal_alpha=None).focal_alpha is None
    assert TrainConfig(loss="asymmetric", asl_gamma_pos=1.0, asl_gamma_neg=0.0, asl_clip=0.0).asl_clip == 0.0
    assert TrainConfig(loss="lsep").loss_record() == {"loss": "lsep"}
    assert TrainConfig().loss_record() == {"loss": "bce", "pos_weight": 4.0}
    assert set(LOSS_PARAMETERS) == set(LOSSES) == {"bce", "focal", "asymmetric", "lsep"}


# --- `genreclf train --loss` ----------------------------------------------------------------------------

TRAIN = ["--model", "gru", "--epochs", "1", "--batch-size", "8", "--lr", "1e-3", "--workers", "0", "--seed", "2"]
LOSS_FLAGS = {
    "bce": [],
    "focal": ["--loss", "focal", "--focal-gamma", "1.5", "--focal-alpha", "none"],
    "asymmetric": ["--loss", "asymmetric", "--asl-gamma-neg", "3", "--asl-clip", "0.1"],
    "lsep": ["--loss", "lsep"],
}
RECORDS = {
    "bce": {"loss": "bce", "pos_weight": 4.0},
    "focal": {"loss": "focal", "focal_gamma": 1.5, "focal_alpha": None},
    "asymmetric": {"loss": "asymmetric", "asl_gamma_pos": 0.0, "asl_gamma_neg": 3.0, "asl_clip": 0.1},
    "lsep": {"loss": "lsep"},
}


def _train(store: Path, run: Path, *flags: str) -> int:
    return main(["-q", "train", "--store", str(store), "--out", str(run), *TRAIN, *flags])


@pytest.fixture(scope="module")
def runs(store_dir, tmp_path_factory) -> Path:
    """One 1-epoch run of each loss, through the command line, from the same seed."""
    root = tmp_path_factory.mktemp("losses")
    for loss, flags in LOSS_FLAGS.items():
        assert _train(store_dir, root / loss, *flags) == 0
    return root


@pytest.mark.parametrize("loss", LOSSES)
def test_train_records_the_loss_in_the_model_file_and_the_run(runs, loss):
    run = runs / loss
    mf = ModelFile.load(run / "model.safetensors")
    assert mf.loss == RECORDS[loss]
    assert mf.provenance["train_config"]["loss"] == loss
    settings = json.loads((run / "settings.json").read_text())
    assert {k: settings["optimiser"][k] for k in RECORDS[loss]} == {**RECORDS[loss]}
    best = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert best["hyper_parameters"]["train_config"]["loss"] == loss  # what a reloaded module trains with


def test_each_loss_trains_a_different_model(runs):
    # The same seed, crops and initial weights: only the loss differs, so the curves and weights do.
    val = {
        loss: float((runs / loss / "logs" / "metrics.csv").read_text().splitlines()[1].split(",")[2]) for loss in LOSSES
    }
    assert all(math.isfinite(v) and v > 0 for v in val.values()) and len(set(val.values())) == len(LOSSES), val
    weights = [ModelFile.load(runs / loss / "model.safetensors").model.state_dict() for loss in LOSSES]
    name = next(iter(weights[0]))
    assert all(not torch.equal(weights[0][name], w[name]) for w in weights[1:])


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # the runs are copied to be resumed
def test_resume_refuses_another_loss_and_accepts_a_run_from_before_losses(runs, store_dir, tmp_path, capsys):
    focal, bce = shutil.copytree(runs / "focal", tmp_path / "focal"), shutil.copytree(runs / "bce", tmp_path / "bce")
    capsys.readouterr()
    assert _train(store_dir, focal, "--epochs", "2", "--loss", "asymmetric", "--resume") == 2
    err = capsys.readouterr().err
    assert "optimiser.loss='focal'" in err and "optimiser.loss='asymmetric'" in err and err.count("\n") == 1
    assert _train(store_dir, focal, "--epochs", "2", "--loss", "focal", "--resume") == 2  # not gamma 1.5, alpha none
    assert "optimiser.focal_gamma=1.5" in capsys.readouterr().err
    assert _train(store_dir, focal, "--epochs", "2", *LOSS_FLAGS["focal"], "--resume") == 0  # the same: resumes

    # A run started before losses could be chosen: settings.json without the loss fields resumes as bce.
    path = bce / "settings.json"
    settings = json.loads(path.read_text())
    for name in ("loss", *(n for names in LOSS_PARAMETERS.values() for n in names if n != "pos_weight")):
        del settings["optimiser"][name]
    path.write_text(json.dumps(settings))
    assert _train(store_dir, bce, "--epochs", "2", "--loss", "lsep", "--resume") == 2
    assert "optimiser.loss='bce'" in capsys.readouterr().err
    assert _train(store_dir, bce, "--epochs", "2", "--resume") == 0


def test_a_model_file_from_before_losses_loads_as_bce(runs, tmp_path):
    from safetensors import safe_open

    with safe_open(str(runs / "bce" / "model.safetensors"), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert json.loads(meta.pop("loss")) == {"loss": "bce", "pos_weight": 4.0}
    provenance = json.loads(meta["provenance"])
    provenance["train_config"] = {k: v for k, v in provenance["train_config"].items() if k in ("lr", "pos_weight")}
    provenance["train_config"]["pos_weight"] = 3.0
    old = save_tensors(tmp_path / "old.safetensors", tensors, {**meta, "provenance": json.dumps(provenance)})
    assert ModelFile.load(old).loss == {"loss": "bce", "pos_weight": 3.0}
    meta["loss"] = json.dumps(["focal"])
    with pytest.raises(GenreclfError, match="damaged genreclf model metadata"):
        ModelFile.load(save_tensors(tmp_path / "bad.safetensors", tensors, meta))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--loss", "focal", "--focal-gamma", "-1"], "focal_gamma must be a number >= 0, got -1.0"),
        (["--loss", "asymmetric", "--asl-clip", "1"], "asl_clip must be in [0, 1), got 1.0"),
        (["--focal-alpha", "0.5"], "focal_alpha=0.5 is a parameter of loss 'focal', not of 'bce'"),
        (["--loss", "lsep", "--pos-weight", "2"], "pos_weight=2.0 is a parameter of loss 'bce', not of 'lsep'"),
    ],
)
def test_bad_loss_parameters_on_the_command_line_get_one_line(store_dir, tmp_path, capsys, flags, message):
    assert _train(store_dir, tmp_path / "run", *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("genreclf: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_unknown_loss_and_non_numbers_are_argparse_errors(store_dir, tmp_path, capsys):
    for flags, message in (
        (["--loss", "hinge"], "invalid choice: 'hinge'"),
        (["--loss", "focal", "--focal-alpha", "half"], "expected a number or none, not 'half'"),
    ):
        with pytest.raises(SystemExit) as exit_:
            _train(store_dir, tmp_path / "run", *flags)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
