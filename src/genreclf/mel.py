"""Log-mel spectrograms in torch, matching the reference recipe (librosa) to ~1e-5.

Reference: `librosa.feature.melspectrogram(y, sr=16000, n_mels=128)` (n_fft 2048,
hop 512, periodic Hann window, centred frames zero-padded, power 2, Slaney mel),
then `(librosa.power_to_db(S, ref=np.max) + 40) / 40`, transposed to (frames, 128).
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np
import torch

from genreclf.audio import HOP_LENGTH, N_FFT, N_MELS, N_SAMPLES, SAMPLE_RATE

AMIN = 1e-10  # power_to_db's floor
TOP_DB = 80.0  # power_to_db's dynamic range


def mel_filterbank(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """Return librosa's Slaney-normalised mel filterbank (n_mels, 1 + n_fft // 2), float32."""
    fft_freqs = np.linspace(0, sample_rate / 2, 1 + n_fft // 2)
    mel_freqs = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2))
    widths = np.diff(mel_freqs)
    ramps = mel_freqs[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_freqs[2:] - mel_freqs[:-2]))[:, None]  # Slaney: equal area per band
    return weights.astype(np.float32)


_F_SP = 200.0 / 3  # Slaney mel scale: linear below 1 kHz ...
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0  # ... logarithmic above


def _hz_to_mel(hz):
    hz = np.asanyarray(hz, dtype=np.float64)
    mel = hz / _F_SP
    log_part = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(hz >= _MIN_LOG_HZ, log_part, mel)


def _mel_to_hz(mel):
    mel = np.asanyarray(mel, dtype=np.float64)
    hz = _F_SP * mel
    log_part = _MIN_LOG_HZ * np.exp(_LOGSTEP * (mel - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, log_part, hz)


@lru_cache(maxsize=8)
def _constants(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float32, device=device)
    filters = torch.from_numpy(mel_filterbank()).to(device)
    if filters.device.type == "cpu":
        with warnings.catch_warnings():  # "sparse CSR support is in beta": we use only CSR @ dense
            warnings.simplefilter("ignore", UserWarning)
            filters = filters.to_sparse_csr()  # 2% of the weights are non-zero: 2x faster on a CPU
    return window, filters


def pad_or_trim(waveform: np.ndarray, length: int = N_SAMPLES) -> np.ndarray:
    """Return `waveform` zero-padded or cropped to `length` samples (the reference's 30 s)."""
    if len(waveform) >= length:
        return waveform[:length]
    return np.pad(waveform, (0, length - len(waveform)))


def log_mel_batch(waveforms: torch.Tensor) -> torch.Tensor:
    """Return normalised log-mel features (batch, frames, 128) of waveforms (batch, samples).

    Each clip is normalised by its own maximum, as power_to_db(ref=np.max) does per clip.
    Runs on the waveforms' device; batch on a GPU, one clip per process on a CPU.
    """
    window, filters = _constants(str(waveforms.device))
    spec = torch.stft(
        waveforms.float(), N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="constant", return_complex=True
    )
    parts = torch.view_as_real(spec).square_()  # (batch, freqs, frames, 2): squared in place
    power = parts[..., 0] + parts[..., 1]  # (batch, freqs, frames); 2x faster than spec.real.square() + ...
    if filters.layout == torch.sparse_csr:
        batch, freqs, frames = power.shape
        flat = power.transpose(0, 1).reshape(freqs, batch * frames)
        mel = (filters @ flat).reshape(-1, batch, frames).transpose(0, 1)  # (batch, mels, frames)
    else:
        mel = torch.matmul(filters, power)  # (batch, mels, frames)
    db = 10.0 * torch.log10(torch.clamp(mel, min=AMIN))
    ref = db.amax(dim=(1, 2), keepdim=True)  # 10*log10(max(amin, ref)) == max of the clamped dB
    db = torch.maximum(db - ref, torch.tensor(-TOP_DB, device=db.device))
    return ((db + 40.0) / 40.0).transpose(1, 2)


def log_mel(waveform: np.ndarray, device: str | torch.device = "cpu") -> np.ndarray:
    """Return the normalised log-mel features (frames, 128) float32 of a mono 16 kHz waveform."""
    if len(waveform) == 0:
        raise ValueError("log_mel of an empty waveform")
    x = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)).to(device)
    with torch.no_grad():
        return log_mel_batch(x[None])[0].cpu().numpy()
