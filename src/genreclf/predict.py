"""Tag audio with a trained model: files, folders or waveforms of any length.

A track is cut into consecutive 30-s windows (the clips the model was trained on, each
normalised on its own as in training); each window is scored by averaging the model's
probabilities over evenly spaced crops; windows are averaged weighted by their real frames.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from genreclf import audio
from genreclf.audio import N_FRAMES, N_SAMPLES, SAMPLE_RATE
from genreclf.data import crop_starts
from genreclf.decide import Decision
from genreclf.errors import GenreclfError
from genreclf.mel import log_mel_batch, valid_frames
from genreclf.modelfile import ModelFile

CROP_FRAMES = 256  # the longest training crop
N_CROPS = 8  # evenly spaced crops per 30-s window


@torch.no_grad()
def score_features(
    model: torch.nn.Module,
    features: torch.Tensor,
    valid: torch.Tensor,
    crop: int | None = CROP_FRAMES,
    n_crops: int = N_CROPS,
) -> torch.Tensor:
    """Return probabilities (batch, genres) for features (batch, frames, mels) with `valid` real frames.

    crop=None scores each whole sequence at once; otherwise the mean over evenly spaced crops.
    """
    if crop is None:
        return torch.sigmoid(model(features, valid))
    total = torch.zeros(len(features), model.cfg.n_genres, device=features.device)
    counts = torch.zeros(len(features), 1, device=features.device)
    # Tracks of equal valid length share crop positions: score them together.
    for n in torch.unique(valid).tolist():
        rows = torch.nonzero(valid == n).flatten()
        for start in crop_starts(int(n), crop, n_crops):
            length = min(crop, int(n))
            x = features[rows, start : start + length]
            lengths = torch.full((len(rows),), length, device=features.device)
            total[rows] += torch.sigmoid(model(x, lengths))
            counts[rows] += 1
    return total / counts


@dataclass(frozen=True)
class Prediction:
    """The genre probabilities of one input."""

    source: str  # file path, or "<waveform>"
    genres: list[str]  # vocabulary order
    probabilities: np.ndarray  # (genres,) float
    decision: Decision | None = None  # the model's thresholds and genre tree, for `chosen`

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """Return the k most probable (genre, probability) pairs, most probable first."""
        order = np.argsort(-self.probabilities, kind="stable")[:k]
        return [(self.genres[i], float(self.probabilities[i])) for i in order]

    def chosen(self, threshold: float | None = None, with_parents: bool = False) -> list[str]:
        """Return the genres whose probability is >= their threshold (or `threshold`), most probable first.

        with_parents adds the ancestors of each chosen genre (Metal brings Rock), after the chosen ones.
        """
        columns = (self.decision or Decision()).chosen(self.probabilities, threshold, with_parents)
        return [self.genres[c] for c in columns]


class Tagger:
    """A trained genre tagger: `Tagger.load(path).predict(file_or_waveform)`."""

    def __init__(
        self,
        model_file: ModelFile,
        device: str | torch.device = "cpu",
        crop: int | None = CROP_FRAMES,
        n_crops: int = N_CROPS,
    ):
        self.file = model_file
        self.model = model_file.model.to(device).eval()
        self.genres = model_file.genres
        self.decision = Decision.of(model_file.genre_ids, model_file.genre_parents, model_file.thresholds)
        self.device = torch.device(device)
        self.crop, self.n_crops = crop, n_crops

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None, **options) -> Tagger:
        """Load the model file at `path` (a model.safetensors, or a run folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "model.safetensors"
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(ModelFile.load(path, device), device, **options)

    def predict(self, source: str | Path | np.ndarray, sample_rate: int = SAMPLE_RATE) -> Prediction:
        """Return the genre probabilities of an audio file or a mono waveform at `sample_rate`."""
        if isinstance(source, np.ndarray):
            if source.ndim != 1 or len(source) == 0:
                raise GenreclfError("a waveform must be a non-empty 1-D array (mono)")
            if not np.isfinite(source).all():
                raise GenreclfError("the waveform holds NaN or infinite samples; clean it (np.nan_to_num) first")
            probabilities = self.probabilities(audio.resample(source, sample_rate))
            return Prediction("<waveform>", self.genres, probabilities, decision=self.decision)
        # Decoded window by window: memory stays at a few windows however long the file is.
        windows = audio.stream(source, block_seconds=N_SAMPLES / SAMPLE_RATE)
        return Prediction(str(source), self.genres, self._score_windows(windows), decision=self.decision)

    def probabilities(self, wave: np.ndarray, windows_per_batch: int = 8) -> np.ndarray:
        """Return genre probabilities of a mono 16-kHz waveform of any length."""
        windows = (wave[s : s + N_SAMPLES] for s in range(0, max(len(wave), 1), N_SAMPLES))
        return self._score_windows(windows, windows_per_batch)

    def _score_windows(self, windows: Iterable[np.ndarray], windows_per_batch: int = 8) -> np.ndarray:
        """Return genre probabilities of consecutive 30-s windows (the last may be shorter), frame-weighted."""
        windows = iter(windows)
        total, frames = 0.0, 0
        padded = np.empty((windows_per_batch, N_SAMPLES), np.float32)  # one batch buffer: memory bounded
        while True:
            valid = []
            for chunk in islice(windows, windows_per_batch):  # copied in as they come: no list of windows held
                row = padded[len(valid)]
                row[: len(chunk)], row[len(chunk) :] = chunk, 0.0
                valid.append(valid_frames(len(chunk), N_FRAMES))
            if not valid:
                break
            x = torch.from_numpy(padded[: len(valid)]).to(self.device)
            v = torch.tensor(valid, device=self.device)
            with torch.no_grad():
                probs = score_features(self.model, log_mel_batch(x), v, self.crop, self.n_crops)
            total = total + (v.float()[:, None] * probs).sum(0)
            frames += int(v.sum())
        return (total / frames).cpu().numpy()
