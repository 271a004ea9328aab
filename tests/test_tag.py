"""Genre tags in the files: every format round-trips, the audio never changes, writes are atomic, undo undoes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import mutagen
import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import REAL_MP3, write_bad_files, write_mp3

import genreclf
from genreclf import audio, tag
from genreclf.cli import main
from genreclf.errors import GenreclfError
from genreclf.modelfile import ModelFile
from genreclf.models import TransformerConfig, model_from_config
from genreclf.predict import Tagger

FORMATS = ["mp3", "flac", "ogg", "opus", "m4a"]


def _tone(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    noise = 0.05 * np.random.default_rng(seed).standard_normal(len(t))
    x = (0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t) + noise).astype(np.float32)
    return np.stack([x, x], 1)


def write_audio(path: Path, seconds: float = 1.5, seed: int = 0) -> Path:
    """Write a short tone in the format of `path`'s extension (M4A by FFmpeg's AAC encoder); return its path."""
    ext = path.suffix
    if ext == ".mp3":
        return write_mp3(path, seconds=seconds, seed=seed)
    if ext == ".m4a":
        with av.open(str(path), "w") as out:
            stream = out.add_stream("aac", rate=44100)
            frame = av.AudioFrame.from_ndarray(
                _tone(seconds, 44100, seed)[:, :1].T.copy(), format="fltp", layout="mono"
            )
            frame.rate = 44100
            for packet in [*stream.encode(frame), *stream.encode(None)]:
                out.mux(packet)
        return path
    kind = {".flac": ("FLAC", None), ".ogg": ("OGG", "VORBIS"), ".opus": ("OGG", "OPUS"), ".wav": ("WAV", None)}
    fmt, subtype = kind[ext]
    sf.write(path, _tone(seconds, 48000, seed), 48000, format=fmt, subtype=subtype)
    return path


def decoded(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return (genreclf's 16-kHz decoding, FFmpeg's raw frames at the file's own rate) of `path`."""
    with av.open(str(path)) as c:
        raw = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(c.streams.audio[0])])
    return audio.load(path), raw


def assert_same_audio(before: tuple[np.ndarray, np.ndarray], path: Path) -> None:
    after = decoded(path)
    for a, b in zip(before, after):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()  # bit-identical, not merely close


def raw_genre_field(path: Path):
    """The genre field as mutagen stores it, so the test reads the file without our code."""
    f = mutagen.File(path)
    if type(f).__name__ == "MP3":
        return [t for frame in f.tags.getall("TCON") for t in frame.text] if f.tags else []
    if type(f).__name__ == "MP4":
        return f.tags.get("\xa9gen", []) if f.tags else []
    return f.tags.get("genre", []) if f.tags else []


@pytest.mark.parametrize("ext", FORMATS)
def test_genres_round_trip_and_the_audio_is_untouched(tmp_path, ext):
    path = write_audio(tmp_path / f"a.{ext}")
    before = decoded(path)
    assert tag.read_genres(path) == []
    tag.write_genres(path, ["Rock", "Jazz"])
    assert tag.read_genres(path) == ["Rock", "Jazz"]
    # One value per genre where the format has several; M4A's players read only the first value: joined.
    assert raw_genre_field(path) == (["Rock; Jazz"] if ext == "m4a" else ["Rock", "Jazz"])
    with av.open(str(path)) as c:  # FFmpeg (and so most players) sees the genre
        meta = {**c.metadata, **c.streams.audio[0].metadata}
    assert "Rock" in {k.lower(): v for k, v in meta.items()}["genre"]
    assert_same_audio(before, path)
    tag.write_genres(path, ["Électronique"])  # not ASCII
    assert tag.read_genres(path) == ["Électronique"]
    tag.write_genres(path, [])
    assert tag.read_genres(path) == [] and raw_genre_field(path) == []
    assert_same_audio(before, path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary copy left


def test_a_real_mp3_keeps_its_other_tags_and_cover_art(tmp_path):
    path = tmp_path / "real.mp3"
    shutil.copyfile(REAL_MP3, path)
    before = audio.load(path)
    change = tag.plan(path, ["Rock", "classical"], "append")
    assert (change.old, change.new, change.changed) == (["Classical"], ["Classical", "Rock"], True)
    tag.apply(change)
    f = mutagen.File(path)
    assert f.tags.version == (2, 4, 0) and f.tags.getall("TCON")[0].text == ["Classical", "Rock"]
    original = mutagen.File(REAL_MP3).tags
    assert f.tags.getall("APIC")[0].data == original.getall("APIC")[0].data  # the cover art, byte for byte
    assert str(f.tags["TIT2"]) == str(original["TIT2"]) and str(f.tags["TPE1"]) == str(original["TPE1"])
    assert audio.load(path).tobytes() == before.tobytes()


def test_modes_fill_replace_append():
    assert tag.merge([], ["Rock", "Jazz"], "fill") == ["Rock", "Jazz"]
    assert tag.merge(["Folk"], ["Rock"], "fill") == ["Folk"]  # a tagged file is left alone
    assert tag.merge(["Folk"], ["Rock", "Rock"], "replace") == ["Rock"]
    assert tag.merge(["Folk", "rock"], ["Rock", "Jazz"], "append") == ["Folk", "rock", "Jazz"]  # case-blind
    for mode in tag.MODES:  # no genre chosen never erases the file's own
        assert tag.merge(["Folk"], [], mode) == ["Folk"]
    with pytest.raises(ValueError, match="mode"):
        tag.merge([], ["Rock"], "overwrite")


def test_plan_writes_nothing_and_apply_only_what_changes(tmp_path):
    path = write_audio(tmp_path / "a.flac")
    tag.write_genres(path, ["Folk"])
    data, mtime = path.read_bytes(), path.stat().st_mtime_ns
    for mode, new, changed in [
        ("fill", ["Folk"], False),
        ("replace", ["Rock"], True),
        ("append", ["Folk", "Rock"], True),
    ]:
        change = tag.plan(path, ["Rock"], mode)
        assert (change.old, change.new, change.changed, change.format) == (["Folk"], new, changed, "flac")
    tag.apply(tag.plan(path, ["Rock"], "fill"))  # nothing to change: the file is not rewritten
    assert path.read_bytes() == data and path.stat().st_mtime_ns == mtime


def test_the_separator_joins_and_splits_m4a_genres(tmp_path):
    path = write_audio(tmp_path / "a.m4a")
    tag.write_genres(path, ["Hip-Hop", "Rock"], separator=" / ")
    assert raw_genre_field(path) == ["Hip-Hop / Rock"]
    assert tag.read_genres(path, separator=" / ") == ["Hip-Hop", "Rock"]
    change = tag.plan(path, ["Jazz", "Rock"], "append", separator=" / ")
    assert change.new == ["Hip-Hop", "Rock", "Jazz"]


def test_permissions_times_and_owner_are_kept(tmp_path):
    path = write_audio(tmp_path / "a.ogg")
    os.chmod(path, 0o640)
    os.utime(path, ns=(978307200_000000000, 1000000000_123456789))
    st = path.stat()
    tag.write_genres(path, ["Rock"])
    after = path.stat()
    assert after.st_ino != st.st_ino  # a new file was renamed over it ...
    assert (after.st_mode, after.st_uid, after.st_gid) == (st.st_mode, st.st_uid, st.st_gid)  # ... like the old
    assert (after.st_atime_ns, after.st_mtime_ns) == (st.st_atime_ns, st.st_mtime_ns)


def test_a_write_interrupted_before_the_rename_leaves_the_original(tmp_path, monkeypatch):
    path = write_audio(tmp_path / "a.mp3")
    data = path.read_bytes()

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)  # the moment after the copy is tagged
    with pytest.raises(KeyboardInterrupt):
        tag.write_genres(path, ["Rock"])
    assert path.read_bytes() == data and [p.name for p in tmp_path.iterdir()] == ["a.mp3"]


KILLED_WRITER = """
import sys
from genreclf import tag
print("ready", flush=True)
while True:
    for genres in (["Rock"], ["Jazz", "Folk"]):
        tag.write_genres(sys.argv[1], genres)
"""


def test_killing_a_writer_at_any_moment_leaves_the_old_or_the_new_file(tmp_path):
    path = write_audio(tmp_path / "a.flac", seconds=3.0)
    frames = sf.read(path, dtype="int32")[0]
    env = {**os.environ, "PYTHONPATH": str(Path(genreclf.__file__).parents[1])}
    rng = np.random.default_rng(0)
    for _ in range(6):
        writer = subprocess.Popen(
            [sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env
        )
        assert writer.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.05, 0.4))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
        assert tag.read_genres(path) in (["Rock"], ["Jazz", "Folk"], [])  # a whole file, old or new
        np.testing.assert_array_equal(sf.read(path, dtype="int32")[0], frames)
        left = [p for p in tmp_path.iterdir() if p != path]  # at most the copy the kill stopped, never the file
        assert all(p.name.startswith(".a.flac.genreclf-tag.") for p in left) and len(left) <= 1
        for p in left:
            p.unlink()


def test_undo_restores_old_genres_and_skips_files_changed_since(tmp_path):
    files = {name: write_audio(tmp_path / name, seed=i) for i, name in enumerate(["a.mp3", "b.flac", "c.m4a"])}
    tag.write_genres(files["b.flac"], ["Folk"])
    before = {name: decoded(p) for name, p in files.items()}
    log_path = tmp_path / "undo.jsonl"
    with tag.UndoLog(log_path) as log:
        for path in files.values():
            tag.apply(tag.plan(path, ["Rock", "Jazz"], "replace"), undo_log=log)
        tag.apply(tag.plan(files["a.mp3"], ["Pop"], "append"), undo_log=log)  # a file changed twice
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(Path(r["path"]).name, r["format"], r["old"], r["new"]) for r in records] == [
        ("a.mp3", "mp3", [], ["Rock", "Jazz"]),
        ("b.flac", "flac", ["Folk"], ["Rock", "Jazz"]),
        ("c.m4a", "mp4", [], ["Rock", "Jazz"]),
        ("a.mp3", "mp3", ["Rock", "Jazz"], ["Rock", "Jazz", "Pop"]),
    ]
    assert all("T" in r["time"] for r in records)
    tag.write_genres(files["c.m4a"], ["Blues"])  # changed by hand after the run
    results = {(Path(r.path).name, r.status) for r in tag.undo(log_path)}
    assert results == {("a.mp3", "restored"), ("b.flac", "restored"), ("c.m4a", "changed since")}
    assert tag.read_genres(files["a.mp3"]) == [] and raw_genre_field(files["a.mp3"]) == []  # no genre at all
    assert tag.read_genres(files["b.flac"]) == ["Folk"]
    assert tag.read_genres(files["c.m4a"]) == ["Blues"]  # the later edit is not lost
    for name, path in files.items():
        assert_same_audio(before[name], path)
    assert [(Path(r.path).name, r.status) for r in tag.undo(log_path)] == [  # again: nothing more to do
        ("a.mp3", "unchanged"),
        ("b.flac", "unchanged"),
        ("c.m4a", "changed since"),
    ]


def test_undo_stops_at_an_edit_made_between_two_runs(tmp_path):
    path = write_audio(tmp_path / "a.flac")
    log_path = tmp_path / "undo.jsonl"
    with tag.UndoLog(log_path) as log:
        tag.apply(tag.plan(path, ["Rock"], "fill"), undo_log=log)
    tag.write_genres(path, ["Blues"])  # by hand
    with tag.UndoLog(log_path) as log:
        tag.apply(tag.plan(path, ["Rock"], "append"), undo_log=log)
        log.record(tag.plan(path, ["Jazz"], "replace"))  # logged, then killed before the write
    assert [(r.status, r.genres) for r in tag.undo(log_path)] == [("changed since", ["Blues"])]
    assert tag.read_genres(path) == ["Blues"]  # the second run undone, the hand edit kept


def test_undo_ignores_a_last_line_cut_by_a_kill_and_refuses_other_files(tmp_path):
    path = write_audio(tmp_path / "a.ogg")
    log_path = tmp_path / "undo.jsonl"
    with tag.UndoLog(log_path) as log:
        tag.apply(tag.plan(path, ["Rock"], "fill"), undo_log=log)
    with open(log_path, "a") as f:
        f.write('{"path": "/x.mp3", "for')
    assert [r.status for r in tag.undo(log_path)] == ["restored"]
    (tmp_path / "notes.txt").write_text("hello\nworld\n")
    with pytest.raises(GenreclfError, match="not an undo log record"):
        list(tag.undo(tmp_path / "notes.txt"))
    with pytest.raises(GenreclfError, match="no such undo log"):
        list(tag.undo(tmp_path / "missing.jsonl"))


def test_files_that_cannot_be_tagged_raise_clear_errors(tmp_path):
    wav = write_audio(tmp_path / "a.wav")
    with pytest.raises(GenreclfError, match="WAVE files have no genre tag genreclf can write"):
        tag.plan(wav, ["Rock"])
    for kind, path in write_bad_files(tmp_path / "bad").items():
        if kind != "truncated":  # 300 bytes of MP3 still have a readable header
            with pytest.raises(GenreclfError, match="corrupt or not audio"):
                tag.plan(path, ["Rock"])
    with pytest.raises(GenreclfError, match="no such file"):
        tag.write_genres(tmp_path / "gone.mp3", ["Rock"])


# --- the command ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """A small untrained tagger's model file: its outputs depend on the audio, which is all these tests need."""
    torch.manual_seed(0)
    config = TransformerConfig(n_genres=5, n_layers=1, n_heads=2, d_ff=32, head_factor=1)
    genres = ["Rock", "Jazz", "Folk", "Pop", "Electronic"]
    mf = ModelFile(model_from_config(config).eval(), config, genres, list(range(1, 6)))
    return mf.save(tmp_path_factory.mktemp("model") / "model.safetensors")


def test_cli_tag_dry_run_write_and_undo(model_path, tmp_path, capsys, caplog):
    music = tmp_path / "music"
    good = [write_audio(music / f"{i}.{ext}", seed=i) for i, ext in enumerate(["mp3", "flac", "opus", "m4a"])]
    tag.write_genres(good[1], ["Folk"])
    wav = write_audio(music / "a.wav")
    broken = music / "broken.mp3"
    shutil.copyfile(write_bad_files(tmp_path / "bad")["random"], broken)
    silent = music / "silent.flac"
    sf.write(silent, np.zeros((48000, 2), np.float32), 48000)
    everything = sorted(p for p in music.rglob("*") if p.is_file())
    snapshot = {p: p.read_bytes() for p in everything}
    tagger = Tagger.load(model_path, device="cpu")
    expected = {p: [g for g, _ in tagger.predict(audio.load(p)).top(2)] for p in good}
    args = ["tag", str(model_path), str(music), "--top", "2", "--threshold", "0.01", "--mode", "append"]

    assert main(args) == 1  # dry run: the WAV and the broken file fail, the others are planned
    out, err = capsys.readouterr()
    assert {p: p.read_bytes() for p in everything} == snapshot  # not a byte changed
    assert f"{good[0]}: (no genre) -> {'; '.join(expected[good[0]])} (dry run)" in out
    assert f"{good[1]}: Folk -> Folk; {'; '.join(expected[good[1]])} (dry run)" in out
    assert f"error: {wav}: WAVE files have no genre tag" in out and f"error: {broken}: " in out
    assert str(silent) not in out and "silent.flac: silent" in caplog.text
    assert "dry run, nothing written: 4 of 7 file(s) would change" in err and "2 input(s) could not" in err

    log_path = tmp_path / "undo.jsonl"
    assert main([*args, "--write", "--undo-log", str(log_path)]) == 1
    out, err = capsys.readouterr()
    for p in good:
        assert tag.read_genres(p) == (["Folk"] if p == good[1] else []) + expected[p]
        assert f"{p}: " in out and "(dry run)" not in out
    assert silent.read_bytes() == snapshot[silent] and wav.read_bytes() == snapshot[wav]
    assert f"tagged 4 of 7 file(s); undo with `genreclf tag --undo {log_path}`" in err
    assert len(log_path.read_text().splitlines()) == 4

    assert main([*args, "--write"]) == 1  # append again: nothing left to add
    assert capsys.readouterr().out.count("(unchanged)") == 4

    assert main(["tag", "--undo", str(log_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("(restored)") == 4
    assert [tag.read_genres(p) for p in good] == [[], ["Folk"], [], []]

    assert main(["tag", str(model_path)]) == 2  # a model and no files
    assert main(["tag", "--undo", str(log_path), str(model_path)]) == 2
    assert "--undo LOG takes nothing else" in capsys.readouterr().err


def test_cli_tag_help_says_what_is_written(capsys):
    with pytest.raises(SystemExit):
        main(["tag", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "dry run" in text and "--write" in text and "--undo LOG" in text
    assert "per-genre thresholds (or one --threshold for all)" in text and "(default: 3)" in text
