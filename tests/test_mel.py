import librosa  # a test dependency (pyproject [test]): missing, the suite must fail, not skip
import numpy as np
import pytest
import torch
from conftest import write_mp3

from genreclf import audio
from genreclf.crops import valid_frames
from genreclf.mel import log_mel, log_mel_batch, mel_filterbank, pad_or_trim

TOLERANCE = 1e-3  # the stated parity target on normalised features


def reference_recipe(wave: np.ndarray) -> np.ndarray:
    """The reference study's features, computed by librosa."""
    spec = librosa.feature.melspectrogram(y=wave, sr=16000, n_mels=128)
    return ((librosa.power_to_db(spec, ref=np.max) + 40) / 40).T


def test_filterbank_matches_librosa():
    ref = librosa.filters.mel(sr=16000, n_fft=2048, n_mels=128)
    np.testing.assert_allclose(mel_filterbank(), ref, atol=1e-8)


def test_real_fma_mp3_matches_reference_recipe(real_mp3):
    wave = pad_or_trim(audio.load(real_mp3))
    ours, ref = log_mel(wave), reference_recipe(wave)
    assert ours.shape == ref.shape == (audio.N_FRAMES, audio.N_MELS) == (938, 128)
    diff = np.abs(ours - ref).max()
    print(f"max |ours - librosa| on the real FMA MP3: {diff:.2e}")
    assert diff <= TOLERANCE
    assert ours.min() >= -1.0 - 1e-6 and ours.max() <= 1.0 + 1e-6


@pytest.mark.parametrize("seconds", [0.3, 2.0, 31.0])
def test_generated_mp3_matches_reference_recipe(tmp_path, seconds):
    wave = pad_or_trim(audio.load(write_mp3(tmp_path / "x.mp3", seconds=seconds, seed=3)))
    assert np.abs(log_mel(wave) - reference_recipe(wave)).max() <= TOLERANCE


def test_batch_equals_one_by_one(tmp_path):
    waves = [pad_or_trim(audio.load(write_mp3(tmp_path / f"{i}.mp3", seconds=2.0, seed=i)), 32000) for i in range(3)]
    batch = log_mel_batch(torch.from_numpy(np.stack(waves))).numpy()
    for i, wave in enumerate(waves):
        np.testing.assert_allclose(batch[i], log_mel(wave), atol=1e-5)


def test_silence_and_valid_frames():
    feats = log_mel(np.zeros(16000, np.float32))
    assert np.isfinite(feats).all()
    assert valid_frames(480000, 938) == 938
    assert valid_frames(16000 * 10, 938) == 313  # frames centred on real audio
    assert valid_frames(1) == 1
    assert len(pad_or_trim(np.ones(5, np.float32), 8)) == 8
    with pytest.raises(ValueError):
        log_mel(np.zeros(0, np.float32))
