"""Audio decoding: any audio file -> mono float32 at 16 kHz, and the signal constants.

The constants below define the reference recipe's signal. They are stored in every
feature store and model file so that a model is never fed audio it was not trained on.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import av

from genreclf.errors import AudioError, GenreclfError

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
MIN_SECONDS = 1.0  # shorter audio is not tagged (featurize records it as failed): too little to tell
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
    def from_dict(cls, d: dict) -> SignalConfig:
        """Settings from a dict written by to_dict."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def check_same(self, other: SignalConfig, what: str) -> None:
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
    little after that point (the tail is cropped by the caller). What the decoders
    print is kept off the terminal and logged at debug level.
    """
    path = _check_file(path)
    said: list[str] = []
    try:
        with _native_stderr(said):
            audio, rate = _decode_soundfile(path, max_seconds)
    except Exception as sf_error:  # libsndfile says only "format not recognised" and the like
        try:
            with _native_stderr(said), _ffmpeg_log(said):
                audio, rate = _decode_pyav(path, max_seconds)
        except Exception as av_error:
            error = _not_audio(path, sf_error, av_error, said)
            _log_said(path, error.details)
            raise error from None
        said.insert(0, f"libsndfile: {sf_error} (decoded by FFmpeg instead)")
    _log_said(path, "; ".join(said))
    if audio.size == 0:
        raise AudioError(f"{path}: decoded to 0 samples; the file is truncated or empty", "; ".join(said))
    return resample(_finite(downmix(audio)), rate, sample_rate)


def stream(
    path: str | Path, sample_rate: int = SAMPLE_RATE, block_seconds: float = CLIP_SECONDS
) -> Iterator[np.ndarray]:
    """Yield the audio at `path` as consecutive mono float32 blocks of `block_seconds` at `sample_rate` Hz.

    The last block is shorter. Decoding, downmixing and resampling (soxr's streaming HQ
    filter) go chunk by chunk, so memory stays at a few blocks however long the file is;
    the blocks put together equal `load(path)`. Errors are those of `load`, raised when
    iteration starts (or, for a file that breaks part-way, where it breaks).
    """
    block = round(block_seconds * sample_rate)
    if block < 1:
        raise ValueError(f"block_seconds={block_seconds} gives blocks of no samples")
    said: list[str] = []
    try:
        yield from _rebuffer(_resampled(_check_file(path), sample_rate, said), block)
    except AudioError as e:
        _log_said(path, e.details)
        raise
    _log_said(path, "; ".join(said))


def _resampled(path: Path, sample_rate: int, said: list[str]) -> Iterator[np.ndarray]:
    """Yield `path` as consecutive mono float32 pieces at `sample_rate`, the same samples as `load` gives."""
    import soxr

    resampler, n_in, n_out = None, 0, 0
    for chunk, rate in _decoded_chunks(path, said):
        if resampler is None and rate != sample_rate:
            resampler = soxr.ResampleStream(rate, sample_rate, 1, dtype="float32", quality="HQ")
        mono = _finite(downmix(chunk))
        n_in += len(mono)
        piece = mono if resampler is None else resampler.resample_chunk(mono)
        n_out += len(piece)
        yield piece
    if n_in == 0:
        raise AudioError(f"{path}: decoded to 0 samples; the file is truncated or empty", "; ".join(said))
    if resampler is not None:  # the filter's delayed tail, fitted to `resample`'s length: ceil
        missing = -(-n_in * sample_rate // rate) - n_out
        tail = resampler.resample_chunk(np.zeros(0, np.float32), last=True)
        yield np.pad(tail, (0, max(0, missing - len(tail))))[: max(0, missing)]


def _rebuffer(pieces: Iterator[np.ndarray], block: int) -> Iterator[np.ndarray]:
    """Yield the concatenated `pieces` in arrays of `block` samples (the last one shorter, none empty)."""
    buf, filled = np.empty(block, np.float32), 0
    for piece in pieces:
        while len(piece):
            n = min(block - filled, len(piece))
            buf[filled : filled + n] = piece[:n]
            filled, piece = filled + n, piece[n:]
            if filled == block:  # each block its own array: a held block pins nothing else
                yield buf
                buf, filled = np.empty(block, np.float32), 0
    if filled:
        yield buf[:filled]


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


def _check_file(path: str | Path) -> Path:
    """Return `path` as a Path if it is a non-empty file, else raise AudioError saying what it is."""
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file; check the path")
    if not path.is_file():
        raise AudioError(f"{path}: not a file; give an audio file (or a folder where a folder is accepted)")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes); re-download or remove it")
    return path


def _not_audio(path: Path, sf_error: Exception, av_error: Exception, said: list[str]) -> AudioError:
    """The error for a file neither decoder can read; both decoders' own messages go to `details`."""
    details = "; ".join([f"libsndfile: {sf_error}", f"FFmpeg: {av_error}", *said])
    return AudioError(
        f"{path}: not a readable audio file (neither libsndfile nor FFmpeg can decode it); "
        "the file is corrupt or not audio",
        details,
    )


def _log_said(path: str | Path, details: str) -> None:
    if details:
        log.debug("%s: the decoders said: %s", path, details)


def _finite(mono: np.ndarray) -> np.ndarray:
    """Return `mono`, or a copy with NaN and inf replaced by 0 and full scale when it holds any."""
    if not np.isfinite(mono.sum()):  # NaN and inf propagate to the sum: 3x cheaper than isfinite().all()
        mono = np.nan_to_num(mono, nan=0.0, posinf=1.0, neginf=-1.0)
    return mono


def _decode_soundfile(path: Path, max_seconds: float | None) -> tuple[np.ndarray, int]:
    import soundfile as sf

    with sf.SoundFile(str(path)) as f:
        frames = -1 if max_seconds is None else int((max_seconds + 1.0) * f.samplerate)
        audio = f.read(frames=frames, dtype="float32", always_2d=True)
        return audio, f.samplerate


def _decode_pyav(path: Path, max_seconds: float | None) -> tuple[np.ndarray, int]:
    chunks, total = [], 0
    container, frames, rate = _open_pyav(path)
    with container:
        limit = None if max_seconds is None else int((max_seconds + 1.0) * rate)
        for chunk in frames:
            chunks.append(chunk)
            total += chunk.shape[1]
            if limit is not None and total >= limit:
                break
    if not chunks:
        return np.zeros((0, 1), np.float32), rate
    return np.concatenate(chunks, axis=1).T.astype(np.float32, copy=False), rate


def _open_pyav(path: Path) -> tuple[av.container.InputContainer, Iterator[np.ndarray], int]:
    """Open `path` with FFmpeg; return (container, its float32 (channels, samples) frames, sample rate)."""
    import av

    container = av.open(str(path), metadata_errors="ignore")
    if not container.streams.audio:
        container.close()
        raise ValueError("no audio stream")
    stream = container.streams.audio[0]
    to_float = av.AudioResampler(format="fltp")  # sample format only: rate and layout kept
    frames = (out.to_ndarray() for frame in container.decode(stream) for out in to_float.resample(frame))
    return container, frames, stream.rate or stream.codec_context.sample_rate


def _decoded_chunks(path: Path, said: list[str]) -> Iterator[tuple[np.ndarray, int]]:
    """Yield (float32 (samples, channels), rate) chunks of `path`: libsndfile's, or FFmpeg's if it cannot.

    As in `load`, FFmpeg takes over wherever libsndfile fails, at the start or part-way (a FLAC
    that loses sync): the frames libsndfile already gave are skipped, so the chunks stay seamless.
    """
    given = 0  # frames handed out
    try:
        for chunk, rate in _soundfile_chunks(path, said):
            yield chunk, rate
            given += len(chunk)
        return
    except Exception as e:  # libsndfile says only "format not recognised" and the like
        sf_error = e
    skip = given
    try:
        for chunk, rate in _pyav_chunks(path, said):
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            chunk, skip = chunk[skip:], 0
            yield chunk, rate
            given += len(chunk)
    except Exception as e:
        if given:  # blocks already given out cannot be taken back: say it broke part-way
            raise AudioError(
                f"{path}: decoding failed part-way through; the file is corrupt or truncated",
                "; ".join([f"libsndfile: {sf_error}", f"FFmpeg: {e}", *said]),
            ) from None
        raise _not_audio(path, sf_error, e, said) from None
    said.insert(0, f"libsndfile: {sf_error} (decoded by FFmpeg instead)")


def _soundfile_chunks(path: Path, said: list[str], seconds: float = 10.0) -> Iterator[tuple[np.ndarray, int]]:
    """Yield libsndfile's (samples, channels) float32 chunks of `seconds`, with their rate."""
    import soundfile as sf

    with _native_stderr(said):
        f = sf.SoundFile(str(path))
    with f:
        n = max(1, int(seconds * f.samplerate))
        while True:
            with _native_stderr(said):  # never around a yield: the caller's own stderr is not ours to take
                chunk = f.read(n, dtype="float32", always_2d=True)
            if len(chunk) == 0:
                return
            yield chunk, f.samplerate


def _pyav_chunks(path: Path, said: list[str], seconds: float = 10.0) -> Iterator[tuple[np.ndarray, int]]:
    """Yield FFmpeg's (samples, channels) float32 chunks of about `seconds`, with their rate."""
    with _native_stderr(said), _ffmpeg_log(said):
        container, frames, rate = _open_pyav(path)
    with container:
        while True:
            chunks, total = [], 0
            with _native_stderr(said), _ffmpeg_log(said):
                for chunk in frames:  # a generator: the next pass resumes where this one stopped
                    chunks.append(chunk)
                    total += chunk.shape[1]
                    if total >= seconds * rate:
                        break
            if not chunks:
                return
            yield np.concatenate(chunks, axis=1).T.astype(np.float32, copy=False), rate


# One redirect of file descriptor 2 at a time: a second thread that nested its own would restore the
# first one's capture file as the process's stderr. A thread that finds it taken decodes uncaptured.
_STDERR_LOCK = threading.Lock()
_STDERR_LIMIT = 4096  # bytes of native chatter kept: a badly broken MP3 can print a resync note per frame


@contextmanager
def _native_stderr(said: list[str]) -> Iterator[None]:
    """Keep what C libraries write to file descriptor 2 meanwhile off the terminal; append it to `said`.

    libmpg123 (inside libsndfile) prints "Note: Illegal Audio-MPEG-Header ... Trying to resync..."
    for corrupt MP3s. Descriptor 2 belongs to the whole process, so it is restored in any case,
    and held only around native calls, never while our caller's code runs.
    """
    if not _STDERR_LOCK.acquire(blocking=False):  # another thread's capture is in place: it takes ours too
        yield
        return
    try:
        redirect = _redirect_stderr()
        try:
            yield
        finally:
            if redirect is not None:
                said.extend(_restore_stderr(*redirect))
    finally:
        _STDERR_LOCK.release()


def _redirect_stderr() -> tuple[int, IO[bytes]] | None:
    """Point descriptor 2 at a new temporary file; return (a copy of the old descriptor, the file), or None."""
    try:
        sink = tempfile.TemporaryFile()  # noqa: SIM115 (closed when the descriptor is restored)
    except OSError:  # no writable temporary folder: decode uncaptured rather than not at all
        return None
    try:
        saved = os.dup(2)
    except OSError:  # no descriptor 2 (a daemon): nothing reaches a terminal anyway
        sink.close()
        return None
    _flush_python_stderr()  # Python's buffered text so far belongs to the real stderr
    os.dup2(sink.fileno(), 2)
    return saved, sink


def _restore_stderr(saved: int, sink: IO[bytes]) -> list[str]:
    """Point descriptor 2 back at `saved`; return what `sink` caught meanwhile (one line, or none)."""
    _flush_python_stderr()
    os.dup2(saved, 2)
    os.close(saved)
    with sink:
        sink.seek(0)
        text = sink.read(_STDERR_LIMIT).decode("utf-8", "replace").strip()
    return ["stderr: " + " | ".join(line.strip() for line in text.splitlines())] if text else []


def _flush_python_stderr() -> None:
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
    except (OSError, ValueError):  # closed or broken: nothing to keep in order
        pass


@contextmanager
def _ffmpeg_log(said: list[str]) -> Iterator[None]:
    """Send FFmpeg's log messages from this thread into `said` instead of the application's logging.

    PyAV already installs a silent FFmpeg log callback at import; an application that turned FFmpeg's
    logs on with av.logging.set_level still gets none from our decoding. av.logging.set_level(None)
    would do it too but is process-wide (all threads) and cannot be undone exactly (get_level does not
    report restore_default_callback), so this per-thread, self-restoring Capture is used instead.
    FFmpeg's own default callback, if restored, prints to descriptor 2, which _native_stderr catches.
    """
    import av.logging

    with av.logging.Capture() as logs:
        try:
            yield
        finally:
            said.extend(f"FFmpeg log: {message.strip()}" for _, _, message in logs)


def find_audio_files(root: str | Path) -> list[Path]:
    """Return the audio files under `root` (a file or a folder, walked recursively), sorted."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.exists():
        raise AudioError(f"{root}: no such file or folder")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
