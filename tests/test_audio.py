import json
import os
import pickle
import subprocess
import sys
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import librosa
import numpy as np
import pytest
import soundfile as sf
from conftest import REAL_MP3, write_bad_files, write_long_wav, write_mp3

import genreclf
from genreclf import audio
from genreclf.errors import AudioError, GenreclfError


def test_real_fma_mp3_decodes_to_mono_16k(real_mp3):
    wave = audio.load(real_mp3)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) / audio.SAMPLE_RATE - 21.55) < 0.05  # ID3 tags and cover art are skipped
    assert 0.01 < np.abs(wave).max() <= 1.0


def test_matches_librosa_load_exactly(real_mp3):
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


def write_m4a(path: Path, seconds: float = 2.0) -> Path:
    """Write an AAC tone in an M4A container (which libsndfile cannot read); return its path."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=44100)
        t = np.arange(int(44100 * seconds)) / 44100
        samples = (0.4 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.rate = 44100
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def test_pyav_fallback_reads_m4a(tmp_path):
    path = write_m4a(tmp_path / "tone.m4a")
    wave = audio.load(path)
    assert abs(len(wave) / audio.SAMPLE_RATE - 2.0) < 0.1
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * audio.SAMPLE_RATE / len(wave) - 330) < 5


def test_bad_files_raise_one_clear_error(tmp_path):
    for kind, path in write_bad_files(tmp_path).items():
        for decode in (audio.load, lambda p: list(audio.stream(p))):
            with pytest.raises(AudioError) as info:
                decode(path)
            message = str(info.value)
            assert message.startswith(f"{path}: ") and message.count(str(path)) == 1, (kind, message)
            assert "\n" not in message and "does not exist" not in message, (kind, message)
            if kind != "empty":
                assert "not a readable audio file" in message, kind
                # The decoders' own words are kept for -v, not shown in the one-line message.
                details = info.value.details
                assert "libsndfile: " in details and "FFmpeg: " in details and "Invalid data" in details, kind
    with pytest.raises(GenreclfError, match="no such file"):
        audio.load(tmp_path / "missing.mp3")
    with pytest.raises(GenreclfError, match="no such file"):
        next(audio.stream(tmp_path / "missing.mp3"))
    with pytest.raises(GenreclfError, match="not a file"):
        audio.load(tmp_path)


def test_audio_error_details_survive_pickling():
    error = pickle.loads(pickle.dumps(AudioError("x.mp3: not audio", details="libsndfile: nope")))
    assert str(error) == "x.mp3: not audio" and error.details == "libsndfile: nope"
    assert AudioError("plain").details == ""


def test_a_file_of_no_samples_is_an_audio_error(tmp_path):
    path = tmp_path / "nothing.wav"
    sf.write(path, np.zeros((0, 1), np.float32), 16000)
    assert path.stat().st_size > 0
    with pytest.raises(AudioError, match="decoded to 0 samples"):
        audio.load(path)
    with pytest.raises(AudioError, match="decoded to 0 samples"):
        list(audio.stream(path))


def write_resyncing_mp3(path: Path) -> Path:
    """The real FMA MP3 with garbage spliced into its middle: libmpg123 complains, resyncs and decodes on."""
    data = REAL_MP3.read_bytes()
    garbage = np.random.default_rng(2).integers(0, 256, 500, dtype=np.uint8).tobytes()
    path.write_bytes(data[: len(data) // 2] + garbage + data[len(data) // 2 :])
    return path


# Run in a child process: native libraries write to file descriptor 2 itself, below pytest's capture.
# The child logs genreclf's debug messages to stdout, so what was kept off stderr can be checked.
DECODE_ALL = """
import json, logging, sys
import av.logging
from genreclf import audio
from genreclf.errors import AudioError
logging.basicConfig(stream=sys.stdout, level=logging.DEBUG, format="LOG %(name)s: %(message)s")
if sys.argv[1] == "ffmpeg-logging-on":  # an application that turned FFmpeg's logs on for its own log
    av.logging.set_level(av.logging.VERBOSE)
    logging.getLogger("libav").setLevel(logging.DEBUG)
    own = logging.StreamHandler(sys.stdout)
    own.setFormatter(logging.Formatter("APP LOG %(name)s: %(message)s"))
    logging.getLogger("libav").addHandler(own)
lengths = {"load": lambda p: len(audio.load(p)), "stream": lambda p: sum(len(b) for b in audio.stream(p))}
result = {}
for path in sys.argv[2:]:
    for name, length in lengths.items():
        try:
            result[path + " " + name] = length(path)
        except AudioError as e:
            result[path + " " + name] = str(e)
result["av_level"] = av.logging.get_level()
print("RESULT " + json.dumps(result))
"""


@pytest.mark.parametrize("mode", ["default", "ffmpeg-logging-on"])
def test_decoder_chatter_stays_off_stderr(tmp_path, mode):
    bad = write_bad_files(tmp_path)
    resync = write_resyncing_mp3(tmp_path / "resync.mp3")
    m4a = write_m4a(tmp_path / "tone.m4a")
    paths = [str(bad["random"]), str(bad["truncated"]), str(resync), str(m4a)]
    env = {**os.environ, "PYTHONPATH": str(Path(genreclf.__file__).parents[1])}
    child = subprocess.run(
        [sys.executable, "-c", DECODE_ALL, mode, *paths], capture_output=True, text=True, env=env, timeout=120
    )
    assert child.returncode == 0, child.stderr
    assert child.stderr == ""
    result = json.loads(child.stdout.split("RESULT ", 1)[1])
    for path in paths[:2]:
        for name in ("load", "stream"):
            assert "not a readable audio file" in result[f"{path} {name}"]
    # The damaged MP3 still decodes to (nearly) the whole track, the same by either route.
    assert result[f"{resync} load"] == result[f"{resync} stream"] > 0.95 * len(audio.load(REAL_MP3))
    assert result[f"{m4a} load"] == result[f"{m4a} stream"] > 0
    assert "Trying to resync" in child.stdout  # libmpg123 did speak: it went to the debug log
    assert result["av_level"] == (None if mode == "default" else av.logging.VERBOSE)  # left as it was
    if mode == "ffmpeg-logging-on":  # FFmpeg's messages about our decoding went to our debug log only
        assert "FFmpeg log: Failed to find two consecutive MPEG audio frames" in child.stdout
        assert "APP LOG" not in child.stdout


def test_stderr_is_restored_after_decoding(tmp_path):
    random = write_bad_files(tmp_path)["random"]
    before = os.fstat(2)
    with pytest.raises(AudioError):
        audio.load(random)
    audio.load(REAL_MP3)

    def decode_a_few(_) -> None:  # threads decoding at once must not leave one's capture file as stderr
        for _ in range(2):
            with pytest.raises(AudioError):
                audio.load(random)
            sum(len(block) for block in audio.stream(REAL_MP3, block_seconds=2.0))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(decode_a_few, range(4)))
    after = os.fstat(2)
    assert (before.st_dev, before.st_ino) == (after.st_dev, after.st_ino)


def assert_stream_equals_load(path: Path, block_seconds: float) -> None:
    whole = audio.load(path)
    blocks = list(audio.stream(path, block_seconds=block_seconds))
    block = round(block_seconds * audio.SAMPLE_RATE)
    assert all(b.dtype == np.float32 and b.ndim == 1 for b in blocks)
    assert [len(b) for b in blocks[:-1]] == [block] * (len(blocks) - 1) and 0 < len(blocks[-1]) <= block
    joined = np.concatenate(blocks)
    assert joined.shape == whole.shape
    assert np.abs(joined - whole).max() < 1e-5


@pytest.mark.parametrize("block_seconds", [30.0, 4.0, 7.3])
def test_stream_equals_load_on_the_real_mp3(block_seconds):
    assert_stream_equals_load(REAL_MP3, block_seconds)


def test_stream_equals_load_on_long_files(tmp_path):
    rng = np.random.default_rng(3)
    t = np.arange(44100 * 130, dtype=np.float32) / 44100  # over 2 minutes: four 30-s blocks and a short one
    x = 0.3 * np.sin(2 * np.pi * 330 * t)[:, None] + 0.05 * rng.standard_normal((len(t), 2), dtype=np.float32)
    wav = tmp_path / "long.wav"
    sf.write(wav, x, 44100, subtype="PCM_16")
    assert_stream_equals_load(wav, 30.0)
    assert_stream_equals_load(write_mp3(tmp_path / "long.mp3", seconds=65.0, channels=1), 30.0)
    assert_stream_equals_load(write_m4a(tmp_path / "long.m4a", seconds=35.0), 30.0)  # FFmpeg, chunk by chunk
    native = tmp_path / "native.wav"  # already at 16 kHz: nothing to resample
    sf.write(native, x[: 16000 * 61].astype(np.float32), 16000)
    assert_stream_equals_load(native, 30.0)


def test_stream_hands_over_to_ffmpeg_where_libsndfile_loses_sync(tmp_path):
    rng = np.random.default_rng(6)
    path = tmp_path / "damaged.flac"
    sf.write(path, 0.3 * rng.standard_normal((44100 * 40, 2), dtype=np.float32), 44100, format="FLAC")
    data = bytearray(path.read_bytes())
    at = int(len(data) * 0.6)  # past the first 10-s chunks libsndfile hands out, before its failure
    data[at : at + 20000] = rng.integers(0, 256, 20000, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError):  # libsndfile alone gives up part-way ("flac decoder lost sync")
        sf.read(path)
    assert len(audio.load(path)) > 35 * audio.SAMPLE_RATE  # FFmpeg decodes around the damage
    assert_stream_equals_load(path, 5.0)


def test_stream_memory_stays_far_below_the_file_size(tmp_path):
    rate, minutes = 44100, 10
    path = write_long_wav(tmp_path / "ten_minutes.wav", minutes, rate)
    whole_float32 = minutes * 60 * rate * 4  # what load holds at the native rate: ~106 MB
    tracemalloc.start()
    try:
        n = sum(len(block) for block in audio.stream(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == minutes * 60 * audio.SAMPLE_RATE
    assert peak < whole_float32 / 10, f"peak {peak / 1e6:.1f} MB"


def test_stream_rejects_empty_blocks():
    with pytest.raises(ValueError):
        next(audio.stream(REAL_MP3, block_seconds=0))


def test_find_audio_files(tmp_path):
    write_mp3(tmp_path / "a" / "x.mp3")
    write_mp3(tmp_path / "b" / "y.MP3")
    (tmp_path / "notes.txt").write_text("hi")
    found = audio.find_audio_files(tmp_path)
    assert [p.name for p in found] == ["x.mp3", "y.MP3"]
    with pytest.raises(GenreclfError):
        audio.find_audio_files(tmp_path / "nope")
