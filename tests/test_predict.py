"""Tagging files: known answers for crop and window averaging; streamed decoding equals tagging the waveform."""

import csv
import io
import json
import os
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import REAL_MP3, write_bad_files, write_long_wav

import genreclf
from genreclf import audio
from genreclf.audio import N_FRAMES, N_SAMPLES, SAMPLE_RATE
from genreclf.cli import main
from genreclf.crops import crop_starts, valid_frames
from genreclf.errors import AudioError, GenreclfError
from genreclf.hierarchy import GenreTree, make_consistent
from genreclf.modelfile import ModelFile
from genreclf.models import TransformerConfig, model_from_config
from genreclf.predict import Tagger, score_features


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """A small untrained tagger's model file: its outputs depend on the audio, which is all these tests need."""
    torch.manual_seed(0)
    config = TransformerConfig(n_genres=5, n_layers=1, n_heads=2, d_ff=32, head_factor=1)  # fast on a CPU
    genres = ["Rock", "Jazz", "Folk", "Pop", "Electronic"]
    mf = ModelFile(model_from_config(config).eval(), config, genres, list(range(1, 6)))
    return mf.save(tmp_path_factory.mktemp("model") / "model.safetensors")


@pytest.mark.parametrize("source", ["real_mp3", "long_wav"])
def test_predicting_a_file_equals_predicting_its_waveform(model_path, tmp_path, source):
    if source == "real_mp3":
        path, tagger = REAL_MP3, Tagger.load(model_path, device="cpu")  # 21.5 s: one short window
    else:  # over 4 minutes at 44.1 kHz: eight full windows and a short one, two batches of windows
        rng = np.random.default_rng(5)
        path = tmp_path / "long.wav"
        sf.write(path, 0.1 * rng.standard_normal((44100 * 250, 2), dtype=np.float32), 44100, subtype="PCM_16")
        tagger = Tagger.load(model_path, device="cpu", n_crops=2)  # fewer crops: the windowing is under test
    streamed = tagger.predict(path)
    whole = tagger.predict(audio.load(path))
    assert streamed.source == str(path) and whole.source == "<waveform>"
    np.testing.assert_allclose(streamed.probabilities, whole.probabilities, rtol=0, atol=1e-5)
    assert np.ptp(streamed.probabilities) > 0  # the model does tell genres apart: a real comparison


def test_predicting_a_long_file_holds_a_few_windows_not_the_file(model_path, tmp_path):
    rate, minutes = 44100, 10
    path = write_long_wav(tmp_path / "ten_minutes.wav", minutes, rate)
    whole_float32 = minutes * 60 * rate * 4  # decoding it whole at its rate: ~106 MB
    tagger = Tagger.load(model_path, device="cpu", crop=None)  # whole windows: the decoding is under test
    tracemalloc.start()  # numpy's buffers (decoded audio, windows) are traced; torch's own are not
    try:
        probabilities = tagger.predict(path).probabilities
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert probabilities.shape == (5,)
    assert peak < 0.3 * whole_float32, f"peak {peak / 1e6:.1f} MB"  # a batch of 8 windows is 15 MB


def test_predicting_bad_files_raises_audio_errors(model_path, tmp_path):
    tagger = Tagger.load(model_path, device="cpu")
    for kind, path in write_bad_files(tmp_path).items():
        with pytest.raises(AudioError, match="empty file" if kind == "empty" else "not a readable audio file"):
            tagger.predict(path)
    nothing = tmp_path / "nothing.wav"
    sf.write(nothing, np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(AudioError, match="decoded to 0 samples"):
        tagger.predict(nothing)
    with pytest.raises(AudioError, match="no such file"):
        tagger.predict(tmp_path / "missing.mp3")


def test_cli_predict_shows_the_decoders_words_only_with_verbose(model_path, tmp_path):
    bad = write_bad_files(tmp_path)["random"]
    env = {**os.environ, "PYTHONPATH": str(Path(genreclf.__file__).parents[1])}
    runs = {}
    for flags in ([], ["-v"]):
        command = [sys.executable, "-m", "genreclf", *flags, "predict", str(model_path), str(bad)]
        runs[bool(flags)] = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    for run in runs.values():
        assert run.returncode == 1
        assert "not a readable audio file" in run.stdout and run.stdout.count(str(bad)) == 2  # heading + error
    quiet, verbose = runs[False].stderr, runs[True].stderr
    assert "the decoders said" not in quiet and "Illegal Audio-MPEG-Header" not in quiet
    said = next(line for line in verbose.splitlines() if "the decoders said" in line)
    assert "libsndfile: " in said and "FFmpeg: Invalid data" in said.replace("[Errno 1094995529] ", "")
    assert "Illegal Audio-MPEG-Header" in said  # libmpg123's note, captured from descriptor 2


def test_cli_predict_into_a_pipe_closed_early_stops_quietly(model_path, tmp_path):
    # As `genreclf predict MODEL FOLDER | head -1`: the reader leaves; no traceback, no error line.
    folder = tmp_path / "music"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.mp3").write_bytes(REAL_MP3.read_bytes())
    env = {**os.environ, "PYTHONPATH": str(Path(genreclf.__file__).parents[1])}
    command = [sys.executable, "-m", "genreclf", "predict", str(model_path), str(folder), "--format", "json"]
    command += ["--threshold", "0.5", "-q"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert json.loads(proc.stdout.readline())["file"].endswith(".mp3")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141
    assert err == ""


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
    expected = (2 * 938 * torch.sigmoid(torch.tensor(0.938)) + 313 * torch.sigmoid(torch.tensor(0.313))) / (
        2 * 938 + 313
    )
    for per_batch in (8, 2):  # all windows in one batch, and a window left for a second batch
        probs = tagger.probabilities(wave, windows_per_batch=per_batch)
        assert probs.shape == (3,)
        np.testing.assert_allclose(probs[2], expected.item(), rtol=1e-6)
    assert tagger.predict(wave).probabilities[2] == np.float32(tagger.probabilities(wave)[2])


def test_chosen_genres_need_thresholds_or_a_global_threshold(model_path):
    prediction = Tagger.load(model_path, device="cpu").predict(REAL_MP3)  # a model file without thresholds
    with pytest.raises(GenreclfError, match="genreclf calibrate"):
        prediction.chosen()
    p = prediction.probabilities
    cut = float(np.sort(p)[-2])  # the second highest probability: exactly two genres pass
    assert prediction.chosen(threshold=cut) == [g for g, _ in prediction.top(2)]
    assert prediction.chosen(threshold=1.0) == [] and len(prediction.chosen(threshold=0.0)) == 5


def test_predict_chooses_by_the_model_thresholds_and_adds_ancestors(tmp_path, capsys):
    # FMA's genre ids (genres.csv): Jazz 4 and Rock 12 are roots, Metal 31 is Rock's, Death-Metal 101 Metal's.
    torch.manual_seed(0)
    config = TransformerConfig(n_genres=4, n_layers=1, n_heads=2, d_ff=32, head_factor=1)
    genres, ids = ["Jazz", "Rock", "Metal", "Death-Metal"], [4, 12, 31, 101]
    mf = ModelFile(model_from_config(config).eval(), config, genres, ids, genre_parents=[0, 0, 12, 31])
    p = Tagger(mf).predict(REAL_MP3).probabilities
    # Thresholds that let Jazz and Death-Metal pass, and nothing else.
    values = [float(p[0]) - 1e-4, 1.0, 1.0, float(p[3]) - 1e-4]
    mf.thresholds = {"values": values, "rule": "by hand", "split": "official", "n_tracks": 0}
    path = mf.save(tmp_path / "model.safetensors")
    prediction = Tagger.load(path, device="cpu").predict(REAL_MP3)
    expected = sorted(["Jazz", "Death-Metal"], key=lambda g: -p[genres.index(g)])
    assert prediction.chosen() == expected
    assert prediction.chosen(with_parents=True) == [*expected, "Metal", "Rock"]
    assert main(["predict", str(path), str(REAL_MP3), "--format", "json", "--with-parents"]) == 0
    record = json.loads(capsys.readouterr().out)  # JSON Lines: one object per file
    assert record["chosen"] == [*expected, "Metal", "Rock"] and len(record["genres"]) == 4
    assert main(["predict", str(path), str(REAL_MP3), "--threshold", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(re.fullmatch(r"   [01]\.\d{3} \* \S+", line) for line in lines[1:5]), lines
    assert lines[5] == "  chosen: " + ", ".join(g for g, _ in prediction.top(4))
    assert main(["predict", str(path), str(REAL_MP3), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["genre"]: r["chosen"] for r in rows} == {"Jazz": "1", "Rock": "0", "Metal": "0", "Death-Metal": "1"}


def test_consistent_probabilities_raise_a_parent_to_its_most_probable_descendant(tmp_path, capsys):
    torch.manual_seed(0)  # Metal comes out more probable than Rock, its parent, on REAL_MP3
    config = TransformerConfig(n_genres=4, n_layers=1, n_heads=2, d_ff=32, head_factor=1)
    genres, ids, parents = ["Jazz", "Rock", "Metal", "Death-Metal"], [4, 12, 31, 101], [0, 0, 12, 31]
    mf = ModelFile(model_from_config(config).eval(), config, genres, ids, genre_parents=parents)
    path = mf.save(tmp_path / "model.safetensors")
    raw = Tagger.load(path, device="cpu").predict(REAL_MP3, timeline=10)
    made = Tagger.load(path, device="cpu", consistent=True).predict(REAL_MP3, timeline=10)
    p, q = raw.probabilities, made.probabilities
    assert p[2] > p[1] and p[2] > p[3]  # Metal above Rock: inconsistent as the model gives it
    np.testing.assert_array_equal(q, [p[0], p[2], p[2], p[3]])  # Rock raised to Metal; the rest kept
    tree = GenreTree.from_ids(ids, parents)
    np.testing.assert_array_equal(made.timeline.probabilities, make_consistent(raw.timeline.probabilities, tree))
    assert tree.is_consistent(made.timeline.probabilities) and not tree.is_consistent(raw.timeline.probabilities)
    many = list(Tagger.load(path, device="cpu", consistent=True).predict_many([REAL_MP3], workers=0))
    np.testing.assert_array_equal(many[0].probabilities, q)
    assert main(["predict", str(path), str(REAL_MP3), "--format", "json", "--consistent", "--threshold", "0.5"]) == 0
    record = json.loads(capsys.readouterr().out)
    shown = {g["genre"]: g["probability"] for g in record["genres"]}
    assert shown["Rock"] == shown["Metal"] == round(float(p[2]), 4)
    assert record["chosen"] == [g for g in ("Rock", "Metal") if q[genres.index(g)] >= 0.5]
    # A model file without the genre tree cannot make its probabilities consistent.
    bare = ModelFile(model_from_config(config).eval(), config, genres, ids).save(tmp_path / "bare.safetensors")
    with pytest.raises(GenreclfError, match="genre tree"):
        Tagger.load(bare, device="cpu", consistent=True)
    assert main(["predict", str(bare), str(REAL_MP3), "--consistent"]) == 2
    assert "genre tree" in capsys.readouterr().err


def _write(path: Path, wave: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    sf.write(path, wave, rate, subtype="FLOAT")  # float: a -75 dBFS level survives the file
    return path


def test_predict_many_equals_predicting_each_file_and_goes_on_past_bad_ones(model_path, tmp_path):
    from conftest import write_mp3

    folder = tmp_path / "music"
    shorts = [write_mp3(folder / "sub" / f"{k}.mp3", seconds=2.0 + k, seed=k) for k in range(5)]
    rng = np.random.default_rng(3)
    long = _write(folder / "long.wav", 0.1 * rng.standard_normal(70 * 44100).astype(np.float32), 44100)
    bad = write_bad_files(tmp_path / "bad")["random"]
    tagger = Tagger.load(model_path, device="cpu", n_crops=2)
    expected = {str(p): tagger.predict(p).probabilities for p in [REAL_MP3, long, *shorts]}
    for workers, per_batch in ((2, 4), (0, 3)):  # 4 or 3 windows a batch: files share batches, long spans them
        results = list(tagger.predict_many([REAL_MP3, folder, bad], workers=workers, windows_per_batch=per_batch))
        assert sorted(r.source for r in results) == sorted([*expected, str(bad)])  # each file exactly once
        for r in results:
            if r.source == str(bad):
                assert "not a readable audio file" in r.error and r.top() == []
            else:
                assert r.error == "" and r.warning == ""
                np.testing.assert_allclose(r.probabilities, expected[r.source], rtol=0, atol=1e-6)
    assert np.ptp(expected[str(long)]) > 0 and np.abs(expected[str(long)] - expected[str(REAL_MP3)]).max() > 1e-3


def test_silent_audio_gets_no_genres_and_silent_windows_are_skipped(model_path, tmp_path):
    rng = np.random.default_rng(8)
    music = 0.1 * rng.standard_normal(30 * SAMPLE_RATE).astype(np.float32)
    near_silent = 10 ** (-75 / 20) * rng.standard_normal(5 * SAMPLE_RATE).astype(np.float32)
    files = {
        "digital": _write(tmp_path / "digital.wav", np.zeros(5 * SAMPLE_RATE, np.float32)),
        "near": _write(tmp_path / "near.wav", near_silent),
        "music": _write(tmp_path / "music.wav", music),
        "then_silence": _write(tmp_path / "then_silence.wav", np.concatenate([music, np.zeros(60 * SAMPLE_RATE)])),
    }
    tagger = Tagger.load(model_path, device="cpu", n_crops=2)
    results = {Path(r.source).stem: r for r in tagger.predict_many(files.values(), workers=1)}
    assert results["digital"].warning == "silent audio (RMS level -inf dBFS < -60 dBFS): not tagged"
    assert results["near"].warning == "silent audio (RMS level -75 dBFS < -60 dBFS): not tagged"
    for kind in ("digital", "near"):
        assert results[kind].top() == [] and results[kind].error == ""
        assert tagger.predict(files[kind]).warning == results[kind].warning  # one file at a time: the same
    # 60 s of silence after the music: scored on the music alone, not diluted by two silent windows.
    np.testing.assert_allclose(
        results["then_silence"].probabilities, tagger.predict(files["music"]).probabilities, rtol=0, atol=1e-6
    )
    assert results["then_silence"].warning == "" and len(results["then_silence"].top(3)) == 3


def test_files_shorter_than_featurizes_minimum_are_errors(model_path, tmp_path):
    from conftest import write_mp3

    short = _write(tmp_path / "short.wav", 0.1 * np.ones(SAMPLE_RATE // 5, np.float32))
    truncated = tmp_path / "truncated.mp3"  # its header says 30 s; 2 kB of it decode to 0.05 s
    truncated.write_bytes(write_mp3(tmp_path / "whole.mp3", seconds=30.0).read_bytes()[:2000])
    tagger = Tagger.load(model_path, device="cpu")
    results = {r.source: r for r in tagger.predict_many([short, truncated], workers=2)}
    assert results[str(short)].error == f"{short}: too short (0.20 s < 1.0 s)"
    assert results[str(truncated)].error == f"{truncated}: too short (0.05 s < 1.0 s)"
    with pytest.raises(AudioError, match=r"too short \(0.20 s < 1.0 s\)"):
        tagger.predict(short)


def test_decoder_processes_import_no_torch():
    # A decoder imports what its job needs and what a spawned process re-imports of the CLI: torch would
    # cost every decoder a second of start-up and a few hundred MB.
    modules = "genreclf.cli, genreclf.pool, genreclf.windows"
    code = f"import sys, {modules}; print(sorted({{'torch', 'pandas'}} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_predict_many_holds_a_few_windows_not_the_file(model_path, tmp_path):
    from genreclf.predict import WINDOWS_PER_BATCH
    from genreclf.windows import Decoding

    minutes, read_ahead = 40, 4  # 154 MB as 16-kHz float32, the form in which the parent receives it
    path = write_long_wav(tmp_path / "forty_minutes.wav", minutes, SAMPLE_RATE)
    bound = (WINDOWS_PER_BATCH + read_ahead + 4) * N_SAMPLES * 4  # the batch, the read-ahead, a few in transit
    assert bound < minutes * 60 * SAMPLE_RATE * 4 / 3  # else the test could not tell a window from the file
    tagger = Tagger.load(model_path, device="cpu", crop=None)
    tracemalloc.start()  # the windows as the parent receives them are numpy buffers: traced
    try:
        (result,) = tagger.predict_many(Decoding([path], workers=1, crop=N_FRAMES, read_ahead=read_ahead))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.error == "" and result.probabilities.shape == (5,)
    assert peak < bound, f"peak {peak / 1e6:.1f} MB"


def test_timeline_segments_and_their_crops():
    from genreclf.timeline import segments_of

    # 10-s segments of a full window: 312.5 frames each, so two 256-frame crops cover each one.
    full = segments_of(0, 30 * SAMPLE_RATE, 10.0, 256)
    assert [(s.start, s.end, s.frames, s.crops) for s in full] == [
        (0.0, 10.0, (0, 312), [(0, 256), (56, 256)]),
        (10.0, 20.0, (312, 625), [(312, 256), (369, 256)]),
        (20.0, 30.0, (625, 938), [(625, 256), (682, 256)]),
    ]
    # The third window of a 72-s track (12 s: 375 frames): a whole segment and a 2-s one, one centred crop.
    last = segments_of(2, 12 * SAMPLE_RATE, 10.0, 256)
    assert [(s.start, s.end, s.frames, s.crops) for s in last] == [
        (60.0, 70.0, (0, 312), [(0, 256), (56, 256)]),
        (70.0, 72.0, (312, 375), [(119, 256)]),  # centred at 343.5, moved back inside the window
    ]
    # Less than half a second after the last whole segment is folded into it.
    assert [(s.start, s.end) for s in segments_of(1, int(10.3 * SAMPLE_RATE), 10.0, 256)] == [(30.0, 40.3)]
    # 5-s segments are shorter than a crop: one crop centred on each.
    assert [s.crops for s in segments_of(1, 30 * SAMPLE_RATE, 5.0, 256)][:2] == [[(0, 256)], [(106, 256)]]


def test_timeline_known_answer_and_silent_segments(model_path, tmp_path):
    from genreclf.mel import log_mel, pad_or_trim

    rng = np.random.default_rng(11)
    noise = lambda seconds: 0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE)).astype(np.float32)  # noqa: E731
    silence = lambda seconds: np.zeros(int(seconds * SAMPLE_RATE), np.float32)  # noqa: E731
    # Window 0: music then silence; window 1: silent; window 2: 12 s of music.
    wave = np.concatenate([noise(15), silence(15), silence(30), noise(12)])
    path = _write(tmp_path / "mix.wav", wave)
    tagger = Tagger.load(model_path, device="cpu", n_crops=2)
    result = tagger.predict(path, timeline=5)
    line = result.timeline
    np.testing.assert_allclose(line.starts, np.arange(0, 72, 5.0))
    assert line.ends[-1] == 72.0 and (line.ends[:-1] == line.starts[1:]).all()
    silent = np.isnan(line.probabilities).all(1)
    assert silent.tolist() == [False] * 3 + [True] * 9 + [False] * 3
    # Known answer: segment [65, 70) is the crop of 256 frames centred on frames [156, 312) of window 2.
    features = log_mel(pad_or_trim(wave[60 * SAMPLE_RATE :]))
    with torch.no_grad():
        x = torch.from_numpy(features[106 : 106 + 256])[None]
        expected = torch.sigmoid(tagger.model(x, torch.tensor([256])))[0].numpy()
    np.testing.assert_allclose(line.probabilities[13], expected, rtol=0, atol=1e-6)
    assert np.abs(line.probabilities[13] - line.probabilities[12]).max() > 1e-4  # segments differ: a real check
    # predict_many gives the same timeline, in worker processes or not, files sharing batches.
    for workers in (0, 1):
        (many,) = tagger.predict_many([path], workers=workers, windows_per_batch=2, timeline=5)
        np.testing.assert_allclose(many.timeline.probabilities, line.probabilities, rtol=0, atol=1e-6)
        np.testing.assert_allclose(many.probabilities, result.probabilities, rtol=0, atol=1e-6)
    assert tagger.predict(path).timeline is None
    with pytest.raises(GenreclfError, match="divide 30 s"):
        tagger.predict(path, timeline=7)


def test_cli_timeline_and_plots(model_path, tmp_path, capsys):
    rng = np.random.default_rng(12)
    music = tmp_path / "a" / "song.wav"
    music.parent.mkdir()
    _write(music, 0.1 * rng.standard_normal(40 * SAMPLE_RATE).astype(np.float32))
    namesake = tmp_path / "b" / "song.wav"  # the same file name in another folder
    namesake.parent.mkdir()
    _write(namesake, 0.1 * rng.standard_normal(12 * SAMPLE_RATE).astype(np.float32))
    plots = tmp_path / "plots"
    args = ["predict", str(model_path), str(music.parent), str(namesake), "--crops", "2", "--top", "2", "-q"]
    assert main([*args, "--format", "json", "--timeline", "10", "--plot", str(plots)]) == 0
    records = {r["file"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    line = records[str(music)]["timeline"]
    assert line["step"] == 10.0 and [(s["start"], s["end"]) for s in line["segments"]] == [
        (0.0, 10.0),
        (10.0, 20.0),
        (20.0, 30.0),
        (30.0, 40.0),
    ]
    assert all(len(s["genres"]) == 2 for s in line["segments"])
    pictures = {records[str(f)]["plot"] for f in (music, namesake)}
    assert len(pictures) == 2 and all(Path(p).parent == plots for p in pictures)
    for picture in pictures:
        assert Path(picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([*args[:3], "--plot", str(plots), "-q"]) == 0  # --plot alone: a 10-s timeline in the table
    assert "0:10.0" in capsys.readouterr().out
    assert main([*args, "--format", "csv", "--timeline", "10"]) == 2
    assert "CSV rows have no room for a timeline" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--timeline", "7"])
    assert "divide 30 s" in capsys.readouterr().err


def test_the_prediction_path_does_not_import_pandas():
    # Tagging pays for what it needs only (decoders, still less: test_decoder_processes_import_no_torch).
    code = "import sys, genreclf.predict; print('pandas' in sys.modules, 'lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_read_ahead_keeps_order_raises_the_sources_error_and_closes_it():
    from genreclf.pool import ReadAhead

    closed = []

    def source(n, fail=False):
        try:
            yield from range(n)
            if fail:
                raise AudioError("decoder said no")
        finally:
            closed.append(n)

    assert list(ReadAhead(source(50), 4)) == list(range(50))  # more items than the queue holds
    with pytest.raises(AudioError, match="decoder said no"):
        list(ReadAhead(source(3, fail=True), 4))
    stream = iter(ReadAhead(source(1000), 4))
    assert next(stream) == 0
    stream.close()  # the caller stops early: the source is closed (a pool would stop its workers)
    assert closed == [50, 3, 1000]
