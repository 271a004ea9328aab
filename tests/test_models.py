"""Models and LightningModules: sizes, any crop length, padding invariance, loss, training."""

from __future__ import annotations

import json
import math

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from genreclf.errors import GenreclfError
from genreclf.lightning_modules import (
    PretrainConfig,
    PretrainModule,
    TaggerModule,
    TrainConfig,
    span_mask,
)
from genreclf.models import (
    GRUConfig,
    TransformerConfig,
    TransformerTagger,
    config_from_dict,
    config_to_dict,
    count_parameters,
    frame_mask,
    masked_mean,
    model_from_config,
    sinusoidal_encoding,
)

SMALL_GRU = GRUConfig(n_genres=5, hidden=16)
SMALL_TRSF = TransformerConfig(n_mels=16, n_genres=5, n_layers=2, n_heads=4, d_ff=32, dropout=0.1)
BOTH_SMALL = [SMALL_GRU, GRUConfig(n_mels=16, n_genres=5, hidden=8, n_layers=1), SMALL_TRSF]


def _id(cfg) -> str:
    return f"{cfg.kind}-{cfg.n_mels}x{cfg.n_layers}"


@pytest.mark.parametrize("cfg, expected", [(GRUConfig(), 768_595), (TransformerConfig(), 720_467)])
def test_reference_parameter_counts(cfg, expected):
    assert count_parameters(model_from_config(cfg)) == expected


def test_parameter_count_follows_n_genres():
    # Only the head depends on n_genres: 256*4g + 4g + 4g*g + g for the GRU.
    g = 10
    gru = model_from_config(GRUConfig(n_genres=g))
    assert count_parameters(gru) == 494_592 + 256 * 4 * g + 4 * g + 4 * g * g + g
    trsf = model_from_config(TransformerConfig(n_genres=g))
    assert count_parameters(trsf) == 529_920 + 128 * 4 * g + 4 * g + 4 * g * g + g


@pytest.mark.parametrize("kind", ["gru", "transformer"])
def test_any_crop_length_gives_logits(kind):
    torch.manual_seed(0)
    model = model_from_config(GRUConfig() if kind == "gru" else TransformerConfig()).eval()
    with torch.no_grad():
        for frames in (1, 128, 200, 256, 938):
            x = torch.rand(2, frames, 128) * 2 - 1
            logits = model(x, torch.tensor([frames, max(1, frames // 2)]))
            assert logits.shape == (2, 163) and torch.isfinite(logits).all()
            assert model(x).shape == (2, 163)


def test_whole_crops_give_what_their_masked_mean_gives():
    # Batches of whole crops leave out their lengths (genreclf.data.lengths_entry): the same logits, to the bit.
    torch.manual_seed(0)
    h = torch.randn(3, 50, 16)
    assert torch.equal(h.sum(1) / 50, masked_mean(h, torch.ones(3, 50, dtype=torch.bool)))
    x = torch.randn(2, 50, 128)
    for model in (model_from_config(GRUConfig()).eval(), model_from_config(TransformerConfig()).eval()):
        with torch.no_grad():
            assert torch.equal(model(x, torch.tensor([50, 50])), model(x))


@pytest.mark.parametrize("cfg", BOTH_SMALL + [GRUConfig(), TransformerConfig()], ids=_id)
def test_padding_does_not_change_the_output(cfg):
    torch.manual_seed(0)
    model = model_from_config(cfg).eval()
    d = cfg.n_mels
    short = torch.rand(1, 37, d) * 2 - 1
    full = torch.rand(1, 60, d) * 2 - 1
    garbage = torch.cat([short, 1e3 * torch.randn(1, 23, d)], dim=1)
    garbage[0, -1, 0] = float("nan")  # padding may be anything
    with torch.no_grad():
        alone = model(short)
        batch = model(torch.cat([garbage, full]), torch.tensor([37, 60]))
        full_alone = model(full)
    torch.testing.assert_close(batch[:1], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[1:], full_alone, atol=1e-5, rtol=0)


def test_positional_encoding_matches_tf_tutorial_formula():
    pe = sinusoidal_encoding(938, 128)
    pos, i = 937, 5  # odd index: cos(pos / 10000^(2*(i//2)/d))
    assert pe[pos, i].item() == pytest.approx(math.cos(pos / 10000 ** (4 / 128)), abs=1e-6)
    assert pe[pos, 4].item() == pytest.approx(math.sin(pos / 10000 ** (4 / 128)), abs=1e-6)
    # Computed for any length: a prefix of a longer table.
    torch.testing.assert_close(sinusoidal_encoding(10, 128), pe[:10])


def _tutorial_encoding(frames: int, dim: int) -> torch.Tensor:
    """The TF tutorial's numpy formula, in float64."""
    pos, i = np.arange(frames)[:, None], np.arange(dim)
    angles = pos / np.power(10000, (2 * (i // 2)) / dim)
    return torch.from_numpy(np.where(i % 2 == 0, np.sin(angles), np.cos(angles)))


def test_positional_encoding_is_built_once_and_leaves_outputs_and_model_files_unchanged():
    torch.manual_seed(0)
    model = TransformerTagger(SMALL_TRSF).eval()
    enc, d = model.encoder, SMALL_TRSF.n_mels
    params = {name for name, _ in model.named_parameters()}
    assert set(model.state_dict()) == params  # the table is not in model files: old ones still load
    table = enc.pe
    assert table.shape == (938, d) and table.dtype == torch.float32
    for frames in (37, 938, 1200):  # 1200: longer than a clip, the table grows
        x = torch.rand(2, frames, d) * 2 - 1
        lengths = torch.tensor([frames, frames // 2])
        mask = frame_mask(lengths, 2, frames, x.device)
        with torch.no_grad():
            got = enc(x, lengths)
            ref = x.masked_fill(~mask.unsqueeze(-1), 0.0) * math.sqrt(d) + _tutorial_encoding(frames, d).float()
            for layer in enc.layers:
                ref = layer(ref, mask)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
        if frames <= 938:
            assert enc.pe is table  # not rebuilt at every forward
    assert enc.pe.shape == (1200, d)
    assert set(model.state_dict()) == params
    TransformerTagger(SMALL_TRSF).load_state_dict(model.state_dict())  # strict
    with torch.no_grad():  # float64 models get the table in float64
        assert enc.double()(torch.zeros(1, 5, d, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("cfg", [GRUConfig(), TransformerConfig(), SMALL_GRU, SMALL_TRSF], ids=_id)
def test_config_dict_round_trip(cfg):
    d = json.loads(json.dumps(config_to_dict(cfg)))
    assert d["kind"] == cfg.kind
    assert config_from_dict(d) == cfg


@pytest.mark.parametrize(
    "d, message",
    [
        ({"kind": "lstm"}, "unknown model kind 'lstm'"),
        ({"n_genres": 3}, "unknown model kind None"),
        ({"kind": "gru", "n_heads": 8}, "unknown key(s) ['n_heads']"),
        ({"kind": "transformer", "n_layers": "4"}, "n_layers must be int"),
        ({"kind": "transformer", "n_heads": 7}, "must divide n_mels"),
        ({"kind": "gru", "hidden": 0}, "hidden must be > 0"),
        ({"kind": "transformer", "dropout": 1.5}, "dropout must be in [0, 1)"),
        (["gru"], "must be a dict"),
    ],
)
def test_bad_config_dicts_raise_clear_errors(d, message):
    with pytest.raises(GenreclfError) as err:
        config_from_dict(d)
    assert message in str(err.value)


def test_span_mask_covers_about_the_ratio_of_real_frames_only():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([400, 100, 3])
    mask = span_mask(lengths, 400, ratio=0.15, span=8, generator=gen)
    assert mask.shape == (3, 400)
    assert not mask[1, 100:].any() and not mask[2, 3:].any()
    assert mask[2].any()  # even a 3-frame clip gets a (shorter) span
    assert 0.05 <= mask[0].float().mean() <= 0.15 + 8 / 400


def _batches(n_mels: int, n_genres: int, n: int = 4, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(12, 25, (8,), generator=gen)
        lengths[0] = 24
        out.append(
            {
                "x": torch.rand(8, 24, n_mels, generator=gen) * 2 - 1,
                "lengths": lengths,
                "y": (torch.rand(8, n_genres, generator=gen) < 0.3).float(),
            }
        )
    return out


def _trainer(steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        **kwargs,
    )


def _one_batch_loader(batch: dict) -> DataLoader:
    return DataLoader([batch], batch_size=None)


@pytest.mark.parametrize("cfg", [SMALL_GRU, SMALL_TRSF], ids=["gru", "transformer"])
def test_tagger_module_training_reduces_the_loss(cfg):
    torch.manual_seed(0)
    batch = _batches(cfg.n_mels, cfg.n_genres, n=1)[0]
    module = TaggerModule(cfg, TrainConfig(lr=3e-3))
    module.eval()
    with torch.no_grad():
        before = module._loss(batch).item()
    module.train()
    _trainer(25).fit(module, _one_batch_loader(batch), _one_batch_loader(batch))
    module.eval()
    with torch.no_grad():
        after = module._loss(batch).item()
    assert after < 0.8 * before
    assert module.trainer.callback_metrics["val_loss"].item() == pytest.approx(after, rel=1e-4)
    assert "train_loss" in module.trainer.callback_metrics and "lr" in module.trainer.callback_metrics


@pytest.mark.filterwarnings("ignore:.*val_loss which is not available", "ignore:You defined a `validation_step`")
def test_tagger_module_checkpoint_reloads(tmp_path):
    torch.manual_seed(0)
    batch = _batches(SMALL_TRSF.n_mels, SMALL_TRSF.n_genres, n=1)[0]
    module = TaggerModule(config_to_dict(SMALL_TRSF), {"lr": 1e-3, "pos_weight": 2.0})
    trainer = _trainer(2)
    trainer.fit(module, _one_batch_loader(batch))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    again = TaggerModule.load_from_checkpoint(tmp_path / "last.ckpt")
    assert again.model_config == SMALL_TRSF and again.train_config.pos_weight == 2.0
    for (k, a), b in zip(module.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    # Resuming continues from the saved step.
    resumed = _trainer(4)
    resumed.fit(TaggerModule(SMALL_TRSF), _one_batch_loader(batch), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.global_step == 4


def test_bad_train_config_raises():
    with pytest.raises(GenreclfError, match="unknown key"):
        TaggerModule(SMALL_GRU, {"learning_rate": 1.0})
    with pytest.raises(GenreclfError, match="transformer"):
        PretrainModule(SMALL_GRU)
    with pytest.raises(GenreclfError, match="pos_weight"):
        TrainConfig(pos_weight=0.0)
    with pytest.raises(GenreclfError, match="mask_ratio"):
        PretrainConfig(mask_ratio=1.0)


def test_pretraining_reduces_the_loss_and_exports_a_loadable_encoder():
    torch.manual_seed(0)
    cfg = SMALL_TRSF
    batches = _batches(cfg.n_mels, cfg.n_genres, n=2)
    # Smooth inputs: a masked frame is predictable from its neighbours.
    for b in batches:
        b["x"] = torch.cumsum(b["x"], dim=1) / 5
    module = PretrainModule(config_to_dict(cfg), PretrainConfig(lr=3e-3, mask_span=2))
    gen = torch.Generator().manual_seed(1)

    def loss() -> float:
        with torch.no_grad():
            module.eval()
            return sum(module.masked_loss(b["x"], b["lengths"], gen.manual_seed(1)).item() for b in batches)

    before = loss()
    module.train()
    _trainer(40).fit(module, DataLoader(batches, batch_size=None), DataLoader(batches, batch_size=None))
    after = loss()
    assert after < 0.7 * before
    assert "val_loss" in module.trainer.callback_metrics

    state = module.encoder_state_dict()
    tagger = TransformerTagger(cfg)
    tagger.load_encoder_state_dict(state)
    for k, v in state.items():
        torch.testing.assert_close(tagger.state_dict()[k], v)
    # Strict: the tagger's encoder keys are exactly the exported ones.
    assert {k for k in tagger.state_dict() if not k.startswith("head.")} == set(state)
    with pytest.raises(GenreclfError, match="do not fit"):
        TransformerTagger(TransformerConfig(n_mels=16, n_heads=4, n_layers=3)).load_encoder_state_dict(state)
    with pytest.raises(GenreclfError, match="not encoder weights"):
        tagger.load_encoder_state_dict({**state, "head.fc.weight": torch.zeros(1)})


def test_cpu_training_uses_fused_adam_with_the_same_update():
    torch.manual_seed(0)
    module = TaggerModule(SMALL_GRU)
    opt = module.configure_optimizers()["optimizer"]
    assert opt.defaults["fused"] is True
    params = list(module.parameters())
    twins = [p.detach().clone().requires_grad_() for p in params]
    plain = torch.optim.Adam(twins, lr=1e-5, eps=1e-7)
    for _ in range(3):
        for p, q in zip(params, twins):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        plain.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, atol=1e-8, rtol=1e-6)
