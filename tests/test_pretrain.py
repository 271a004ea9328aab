"""The reference's pretraining mask (random_mask): its distribution, and pretraining with it."""

import torch

from genreclf.config import PretrainConfig
from genreclf.lightning_modules import PretrainModule, reference_mask
from genreclf.models import TransformerConfig, config_to_dict


def test_reference_mask_is_the_reference_chain_on_the_same_draws():
    lengths = torch.tensor([300, 120, 5])
    mask = reference_mask(lengths, 300, torch.Generator().manual_seed(3))
    # The same draws, in the order reference_mask takes them, run through the reference's loop.
    gen = torch.Generator().manual_seed(3)
    starts = torch.rand(3, 300, generator=gen) < 0.1
    goes_on = torch.rand(3, 300, generator=gen) < 0.5
    for row in range(3):
        masked = False
        for t in range(300):
            masked = bool(starts[row, t]) or (masked and bool(goes_on[row, t]))
            assert bool(mask[row, t]) == (masked and t < int(lengths[row])), (row, t)


def test_reference_mask_masks_18_percent_in_runs_of_2_2_frames():
    mask = reference_mask(torch.full((200,), 1000), 1000, torch.Generator().manual_seed(0))
    fraction = mask.float().mean().item()
    assert abs(fraction - 0.1 / 0.55) < 0.005  # stationary P(masked) = 0.1 / (1 - 0.55 + 0.1)
    runs = (mask[:, 1:] & ~mask[:, :-1]).sum() + mask[:, 0].sum()
    assert abs(mask.sum().item() / runs.item() - 1 / 0.45) < 0.05  # mean run: 1 / P(stop) = 2.22 frames


def test_pretraining_with_the_reference_masking_zeroes_the_masked_frames():
    torch.manual_seed(0)
    cfg = TransformerConfig(n_mels=16, n_genres=5, n_layers=1, n_heads=2, d_ff=32, head_factor=1)
    module = PretrainModule(config_to_dict(cfg), PretrainConfig(masking="reference"))
    seen = []
    module.encoder.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    x = torch.rand(4, 64, 16) + 1.0  # no zeros of its own
    lengths = torch.tensor([64, 64, 40, 64])
    loss = module.masked_loss(x, lengths, torch.Generator().manual_seed(5))
    mask = reference_mask(lengths, 64, torch.Generator().manual_seed(5))
    assert torch.isfinite(loss) and mask.any()
    assert (seen[0][mask] == 0).all() and (seen[0][~mask] == x[~mask]).all()  # input masked, the rest as it was
    assert module.hparams["pretrain_config"]["masking"] == "reference"  # kept in checkpoints
