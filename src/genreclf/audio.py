"""Audio decoding: any audio file -> mono float32 at 16 kHz, and the signal constants.

The constants below define the reference recipe's signal. They are stored in every
feature store and model file so that a model is never fed audio it was not trained on.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from genreclf.errors import AudioError, GenreclfError, first_line

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000  # Hz, the reference recipe's librosa.load(sr=16000)
N_FFT = 2048  # librosa's melspectrogram default
HOP_LENGTH = 512  # librosa's melspectrogram default
N_MELS = 128  # mel bands = the models' input width
CLIP_SECONDS = 30  # FMA clips are 30 s; features are padded or cropped to this
N_SAMPLES = CLIP_SECONDS * SAMPLE_RATE  # 480,000 samples in a clip
N_FRAMES = 1 + N_SAMPLES // HOP_LENGTH  # 938 frames (centred STFT)

# Audio whose RMS level is below this is treated as silence: no genres are learnt from it or given to it.
# -60 dBFS RMS is ~40 dB below quiet music (a pianissimo passage sits near -40 dBFS RMS) and well above
# dither and encoder noise floors (below -90 dBFS); a digitally silent clip has no level at all (-inf).
SILENCE_DBFS = -60.0

AUDIO_EXTENSIONS = (".mp3", ".wav", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".aiff", ".aif", ".wma")


@dataclass(frozen=True)
class SignalConfig:
    """The settings that define a feature: saved with every store and model."""

    sample_rate: int = SAMPLE_RATE  # Hz after resampling
    n_fft: int = N_FFT  # STFT window length in samples (Hann window)
    hop_length: int = HOP_LENGTH  # samples between frames
    n_mels: int = N_MELS  # Slaney-normalised mel bands from 0 Hz to Nyquist
    clip_seconds: int = CLIP_SECONDS  # clips are padded or cropped to this length
    normalisation: str = "(power_to_db(ref=max, top_db=80) + 40) / 40"  # the reference's scaling

    @property
    def n_samples(self) -> int:
        """Samples in one clip."""
        return self.clip_seconds * self.sample_rate

    @property
    def n_frames(self) -> int:
        """Frames in one clip."""
        return 1 + self.n_samples // self.hop_length

    def to_dict(self) -> dict:
        """The settings as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SignalConfig":
        """Settings from a dict written by to_dict."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def check_same(self, other: "SignalConfig", what: str) -> None:
        """Raise GenreclfError if `other` (from `what`) has different settings."""
        if self != other:
            diff = {k: (v, getattr(other, k)) for k, v in asdict(self).items() if getattr(other, k) != v}
            raise GenreclfError(
                f"{what} was made with other audio settings {diff} (expected, found); "
                "re-featurize the audio or use a model trained on these settings"
            )


def load(path: str | Path, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None) -> np.ndarray:
    """Return the audio at `path` as mono float32 at `sample_rate` Hz.

    Decodes with libsndfile (MP3, WAV, FLAC, OGG, ...) and falls back to FFmpeg
    (PyAV) for what libsndfile cannot read (M4A/AAC, Opus, WMA, odd MP3s). Channels
    are averaged, then resampled with soxr's high-quality band-limited filter: the
    same chain as librosa.load, sample for sample. `max_seconds` stops decoding a
    little after that point (the tail is cropped by the caller).
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file; check the path")
    if not path.is_file():
        raise AudioError(f"{path}: not a file; give an audio file (or a folder where a folder is accepted)")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes); re-download or remove it")
    try:
        audio, rate = _decode_soundfile(path, max_seconds)
    except Exception as sf_error:  # libsndfile says only "format not recognised" and the like
        try:
            audio, rate = _decode_pyav(path, max_seconds)
        except Exception as av_error:
            raise AudioError(
                f"{path}: cannot decode audio ({first_line(sf_error)}; {first_line(av_error)}); "
                "the file is corrupt or not audio"
            ) from None
    if audio.size == 0:
        raise AudioError(f"{path}: decoded to 0 samples; the file is truncated or empty")
    mono = downmix(audio)
    if not np.isfinite(mono.sum()):  # NaN and inf propagate to the sum: 3x cheaper than isfinite().all()
        mono = np.nan_to_num(mono, nan=0.0, posinf=1.0, neginf=-1.0)
    return resample(mono, rate, sample_rate)


def rms_dbfs(wave: np.ndarray) -> float:
    """Return the RMS level of a waveform in dB relative to full scale (-inf for digital silence)."""
    if len(wave) == 0:
        return float("-inf")
    power = float(np.dot(wave, wave)) / len(wave)  # float32 dot accumulates blockwise: ~1e-6 relative
    return 10.0 * np.log10(power) if power > 0 else float("-inf")


def is_silent(wave: np.ndarray, threshold_dbfs: float = SILENCE_DBFS) -> bool:
    """Return True when a (mono, decoded, unnormalised) waveform's RMS level is below `threshold_dbfs`."""
    return rms_dbfs(wave) < threshold_dbfs


def downmix(audio: np.ndarray) -> np.ndarray:
    """Return the mean of the channels of (samples, channels) audio, as librosa's to_mono.

    Adding columns is ~10x faster than `mean(axis=1)` over the short channel axis, and for
    stereo gives the same bits: (left + right) / 2 either way.
    """
    if audio.shape[1] == 1:
        return audio[:, 0]
    total = audio[:, 0] + audio[:, 1]
    for c in range(2, audio.shape[1]):
        total += audio[:, c]
    total /= np.float32(audio.shape[1])  # in place: the same bits as total / n, one array fewer
    return total


def resample(audio: np.ndarray, orig_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Return mono `audio` resampled to `target_rate` with soxr HQ (librosa's default)."""
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    if orig_rate == target_rate:
        return audio
    import soxr

    out = soxr.resample(audio, orig_rate, target_rate, quality="HQ").astype(np.float32, copy=False)
    n_out = -(-len(audio) * target_rate // orig_rate)  # ceil, as librosa.resample fixes the length
    if len(out) < n_out:
        out = np.pad(out, (0, n_out - len(out)))
    return out[:n_out]


def _decode_soundfile(path: Path, max_seconds: float | None) -> tuple[np.ndarray, int]:
    import soundfile as sf

    with sf.SoundFile(str(path)) as f:
        frames = -1 if max_seconds is None else int((max_seconds + 1.0) * f.samplerate)
        audio = f.read(frames=frames, dtype="float32", always_2d=True)
        return audio, f.samplerate


def _decode_pyav(path: Path, max_seconds: float | None) -> tuple[np.ndarray, int]:
    import av

    chunks, rate, total = [], 0, 0
    with av.open(str(path), metadata_errors="ignore") as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        rate = stream.rate or stream.codec_context.sample_rate
        to_float = av.AudioResampler(format="fltp")  # sample format only: rate and layout kept
        limit = None if max_seconds is None else int((max_seconds + 1.0) * rate)
        for frame in container.decode(stream):
            for out in to_float.resample(frame):
                chunk = out.to_ndarray()  # (channels, samples)
                chunks.append(chunk)
                total += chunk.shape[1]
            if limit is not None and total >= limit:
                break
    if not chunks:
        return np.zeros((0, 1), np.float32), rate
    return np.concatenate(chunks, axis=1).T.astype(np.float32, copy=False), rate


def find_audio_files(root: str | Path) -> list[Path]:
    """Return the audio files under `root` (a file or a folder, walked recursively), sorted."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.exists():
        raise AudioError(f"{root}: no such file or folder")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
