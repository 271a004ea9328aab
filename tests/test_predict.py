"""Known answers for inference: crop averaging and the frame-weighted average over 30-s windows."""

from types import SimpleNamespace

import numpy as np
import torch

from genreclf.audio import N_FRAMES, SAMPLE_RATE
from genreclf.data import crop_starts
from genreclf.mel import valid_frames
from genreclf.modelfile import ModelFile
from genreclf.predict import Tagger, score_features


class Probe(torch.nn.Module):
    """A stand-in tagger whose logits say what it was shown: the first and last frame's value, and the length."""

    def __init__(self):
        super().__init__()
        self.cfg = SimpleNamespace(n_genres=3)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        last = x[torch.arange(len(x)), lengths - 1, 0]
        return torch.stack([x[:, 0, 0], last, lengths.float()], 1) / 1000


def test_probabilities_are_the_mean_over_the_evenly_spaced_crops():
    assert crop_starts(938, 256, 8) == [0, 97, 195, 292, 390, 487, 585, 682]
    valid = torch.tensor([938, 300, 938, 100])  # two of equal length share a batch; one shorter than a crop
    frames = torch.arange(1, 939, dtype=torch.float32)  # frame t holds t + 1; padding holds 0
    features = (frames[None, :, None] * (frames[None, :, None] <= valid[:, None, None])).expand(-1, -1, 4)
    probs = score_features(Probe(), features.contiguous(), valid, crop=256, n_crops=8)
    for row, n in enumerate(valid.tolist()):
        length = min(256, n)
        logits = torch.tensor([[s + 1, s + length, length] for s in crop_starts(n, 256, 8)]) / 1000
        torch.testing.assert_close(probs[row], torch.sigmoid(logits).mean(0))
    assert len(crop_starts(100, 256, 8)) == 1 and probs[3, 1] == torch.sigmoid(torch.tensor(0.1))


def test_windows_of_a_long_file_are_averaged_by_their_real_frames():
    # 70 s: two full 30-s windows (938 frames) and 10 s whose 313 frames are real audio.
    assert valid_frames(10 * SAMPLE_RATE, N_FRAMES) == 313
    wave = np.random.default_rng(0).standard_normal(70 * SAMPLE_RATE).astype(np.float32) * 0.1
    tagger = Tagger(ModelFile(Probe(), config=None, genres=["a", "b", "c"], genre_ids=[1, 2, 3]), crop=None)
    # With crop=None the model sees each whole window: its third logit is the window's real frames / 1000.
    expected = (2 * 938 * torch.sigmoid(torch.tensor(0.938)) + 313 * torch.sigmoid(torch.tensor(0.313))) / (2 * 938 + 313)
    for per_batch in (8, 2):  # all windows in one batch, and a window left for a second batch
        probs = tagger.probabilities(wave, windows_per_batch=per_batch)
        assert probs.shape == (3,)
        np.testing.assert_allclose(probs[2], expected.item(), rtol=1e-6)
    assert tagger.predict(wave).probabilities[2] == np.float32(tagger.probabilities(wave)[2])
