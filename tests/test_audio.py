import numpy as np
import pytest
import soundfile as sf

from conftest import write_bad_files, write_mp3
from genreclf import audio
from genreclf.errors import AudioError, GenreclfError


def test_real_fma_mp3_decodes_to_mono_16k(real_mp3):
    wave = audio.load(real_mp3)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) / audio.SAMPLE_RATE - 21.55) < 0.05  # ID3 tags and cover art are skipped
    assert 0.01 < np.abs(wave).max() <= 1.0


def test_matches_librosa_load_exactly(real_mp3):
    librosa = pytest.importorskip("librosa")
    ours = audio.load(real_mp3)
    ref, _ = librosa.load(real_mp3, sr=audio.SAMPLE_RATE)
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("fmt,ext", [("WAV", ".wav"), ("FLAC", ".flac"), ("OGG", ".ogg")])
def test_other_formats_and_rates(tmp_path, fmt, ext):
    rate = 22050
    t = np.arange(rate) / rate
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    path = tmp_path / f"tone{ext}"
    sf.write(path, np.stack([x, x], 1), rate, format=fmt)
    wave = audio.load(path)
    assert abs(len(wave) - audio.SAMPLE_RATE) <= 1
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * audio.SAMPLE_RATE / len(wave) - 440) < 3


def test_max_seconds_gives_the_same_prefix(tmp_path):
    path = write_mp3(tmp_path / "a.mp3", seconds=6.0)
    full = audio.load(path)
    head = audio.load(path, max_seconds=3.0)
    n = 3 * audio.SAMPLE_RATE
    assert len(head) >= n
    np.testing.assert_allclose(head[:n], full[:n], atol=1e-6)


def test_pyav_fallback_reads_m4a(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "tone.m4a"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=44100)
        t = np.arange(44100 * 2) / 44100
        samples = (0.4 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.rate = 44100
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    wave = audio.load(path)
    assert abs(len(wave) / audio.SAMPLE_RATE - 2.0) < 0.1
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * audio.SAMPLE_RATE / len(wave) - 330) < 5


def test_bad_files_raise_one_clear_error(tmp_path):
    for kind, path in write_bad_files(tmp_path).items():
        with pytest.raises(AudioError) as info:
            audio.load(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message, kind
    with pytest.raises(GenreclfError, match="no such file"):
        audio.load(tmp_path / "missing.mp3")
    with pytest.raises(GenreclfError, match="not a file"):
        audio.load(tmp_path)


def test_find_audio_files(tmp_path):
    write_mp3(tmp_path / "a" / "x.mp3")
    write_mp3(tmp_path / "b" / "y.MP3")
    (tmp_path / "notes.txt").write_text("hi")
    found = audio.find_audio_files(tmp_path)
    assert [p.name for p in found] == ["x.mp3", "y.MP3"]
    with pytest.raises(GenreclfError):
        audio.find_audio_files(tmp_path / "nope")
