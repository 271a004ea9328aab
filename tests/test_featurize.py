import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from conftest import write_bad_files

from genreclf import audio
from genreclf.errors import GenreclfError
from genreclf.featurize import featurize, featurize_file
from genreclf.mel import log_mel, pad_or_trim
from genreclf.metadata import audio_path, load_fma
from genreclf.store import FeatureStore


def test_store_holds_the_corpus(corpus, store_dir):
    store = FeatureStore.open(store_dir)
    labels = load_fma(corpus / "fma_metadata")
    assert len(store) == len(labels) == 30 and len(store.failed) == 0
    np.testing.assert_array_equal(store.track_ids, np.sort(labels.track_ids))
    assert store.genres == list(labels.genres) and len(store.genres) == 163
    rows = labels.row_of(store.track_ids)
    np.testing.assert_array_equal(store.targets, labels.targets[rows])
    np.testing.assert_array_equal(store.split, labels.split[rows])
    tid = int(store.track_ids[3])
    feats = store.features(tid)
    assert feats.shape == (938, 128) and feats.dtype == np.float16
    wave = audio.load(audio_path(corpus / "fma_large", tid))
    expected = log_mel(pad_or_trim(wave))
    assert np.abs(feats.astype(np.float32) - expected).max() < 2e-3  # float16 storage
    assert store.valid_frames[3] == -(-len(wave) // 512)  # 4-s clip: real frames only, the rest padding
    assert store.signal == audio.SignalConfig()


def test_real_fma_mp3_featurizes(real_mp3):
    feats, n_valid = featurize_file(real_mp3)
    assert feats.shape == (938, 128)
    assert n_valid == -(-int(21.55 * 16000) // 512) or abs(n_valid - 674) <= 2  # 21.55 s of 30


def _copy_corpus(corpus, tmp_path):
    dst = tmp_path / "corpus"
    shutil.copytree(corpus, dst)
    return dst


def test_bad_files_are_recorded_and_the_job_goes_on(corpus, tmp_path):
    data = _copy_corpus(corpus, tmp_path)
    ids = load_fma(data / "fma_metadata").track_ids
    bad = write_bad_files(tmp_path / "bad")
    victims = {}
    for tid, kind in zip(ids[:4], ["empty", "truncated", "random", "text"]):
        shutil.copyfile(bad[kind], audio_path(data / "fma_large", tid))
        victims[int(tid)] = kind
    os.remove(audio_path(data / "fma_large", ids[4]))
    victims[int(ids[4])] = "missing"
    result = featurize(data, tmp_path / "store", workers=2, progress=False)
    assert (result.done, result.failed, result.complete) == (25, 5, True)
    store = FeatureStore.open(tmp_path / "store")
    assert len(store) == 25 and set(store.failed["track_id"]) == set(victims)
    reasons = dict(zip(store.failed["track_id"], store.failed["reason"]))
    assert "empty" in reasons[int(ids[0])]
    assert "no such file" in reasons[int(ids[4])]
    assert all("\n" not in r for r in reasons.values())
    # Running again changes nothing and keeps the failures.
    again = featurize(data, tmp_path / "store", workers=1, progress=False)
    assert (again.done, again.failed) == (25, 5)
    # Restore one file: --retry-failed featurizes it, the others fail again.
    shutil.copyfile(audio_path(corpus / "fma_large", ids[4]), audio_path(data / "fma_large", ids[4]))
    retried = featurize(data, tmp_path / "store", workers=1, retry_failed=True, progress=False)
    assert (retried.done, retried.failed, retried.complete) == (26, 4, True)
    store = FeatureStore.open(tmp_path / "store")
    assert int(ids[4]) in set(store.track_ids) and int(ids[4]) not in set(store.failed["track_id"])
    listed = pd.read_csv(tmp_path / "store" / "part-0-of-1" / "failed.csv")  # what the user is pointed to
    assert sorted(listed["track_id"]) == sorted(int(t) for t in ids[:4])


def test_killed_run_resumes_to_the_same_store(corpus, store_dir, tmp_path):
    out = tmp_path / "store"
    cmd = [
        sys.executable,
        "-m",
        "genreclf",
        "-q",
        "featurize",
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "part-0-of-1" / "state.npy"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if state.exists() and (np.load(state) != 0).sum() >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = int((np.load(state) != 0).sum())
    assert 5 <= done < 30, "the run was not interrupted in the middle"
    with pytest.raises(GenreclfError, match="not finished"):
        FeatureStore.open(out)
    result = featurize(corpus, out, workers=2, progress=False)
    assert result.complete and result.done == 30
    resumed, plain = FeatureStore.open(out), FeatureStore.open(store_dir)
    np.testing.assert_array_equal(resumed.track_ids, plain.track_ids)
    np.testing.assert_array_equal(resumed.valid_frames, plain.valid_frames)
    for i in range(len(plain)):
        np.testing.assert_array_equal(resumed.item(i), plain.item(i))


def test_ctrl_c_stops_featurize_with_one_line_and_it_resumes(corpus, store_dir, tmp_path):
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "genreclf", "featurize", "--data", str(corpus), "--out", str(out), "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    state = out / "part-0-of-1" / "state.npy"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (state.exists() and (np.load(state) != 0).sum() >= 3):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the parent and its workers get it
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted; run the same command again" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err  # workers leave it to the parent
    result = featurize(corpus, out, workers=2, progress=False)
    assert result.complete and result.done == 30
    for i in range(len(FeatureStore.open(store_dir))):
        np.testing.assert_array_equal(FeatureStore.open(out).item(i), FeatureStore.open(store_dir).item(i))


def test_reusing_a_store_with_other_options_is_refused(corpus, store_dir):
    with pytest.raises(GenreclfError, match="other options"):
        featurize(corpus, store_dir, labels="genres_all", progress=False)


def test_resuming_after_the_labels_changed_is_refused(corpus, tmp_path):
    data = _copy_corpus(corpus, tmp_path)
    featurize(data, tmp_path / "store", subset="small", workers=1, progress=False)
    tracks = data / "fma_metadata" / "tracks.csv"
    table = pd.read_csv(tracks, index_col=0, header=[0, 1])
    first = table.index[table[("set", "subset")] == "small"][0]
    table.loc[first, ("track", "genres")] = (
        "[12, 25]" if table.loc[first, ("track", "genres")] != "[12, 25]" else "[12]"
    )
    table.to_csv(tracks, lineterminator="\n")
    with pytest.raises(GenreclfError, match="other labels"):
        featurize(data, tmp_path / "store", subset="small", progress=False)


def test_not_a_store_and_missing_audio_folder(tmp_path, corpus):
    with pytest.raises(GenreclfError, match="not a feature store"):
        FeatureStore.open(tmp_path)
    meta_only = tmp_path / "meta_only"
    shutil.copytree(corpus / "fma_metadata", meta_only / "fma_metadata")
    with pytest.raises(GenreclfError, match="no audio folder"):
        featurize(meta_only, tmp_path / "s", progress=False)


def test_wrong_audio_folder_or_device_stops_before_any_work(corpus, tmp_path):
    with pytest.raises(GenreclfError, match="no such audio folder"):
        featurize(corpus, tmp_path / "a", audio_dir=corpus / "fma_lagre", progress=False)
    with pytest.raises(GenreclfError, match="none of the first 30 audio files exists"):
        featurize(corpus, tmp_path / "b", audio_dir=corpus / "fma_metadata", progress=False)
    with pytest.raises(GenreclfError, match="cannot use --device bogus"):
        featurize(corpus, tmp_path / "c", device="bogus", progress=False)
    # Validated before anything is allocated: a refused run leaves no store and no features file behind.
    assert not any((tmp_path / name).exists() for name in "abc")


def test_a_refused_run_keeps_what_was_there(corpus, store_dir, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in store_dir.rglob("*")}
    with pytest.raises(GenreclfError, match="other options"):
        featurize(corpus, store_dir, labels="genres_all", progress=False)
    assert {p: p.stat().st_mtime_ns for p in store_dir.rglob("*")} == before
    out = tmp_path / "empty_folder_of_the_user"
    out.mkdir()
    with pytest.raises(GenreclfError, match="none of the first"):
        featurize(corpus, out, audio_dir=corpus / "fma_metadata", progress=False)
    assert out.is_dir() and not any(out.iterdir())  # the user's folder stays, nothing inside it


def test_a_failed_shard_removes_only_its_own_part(tmp_path):
    # Two shards started at once in a new store folder: the one that created the folder fails first.
    from genreclf.featurize import _remove_created

    out = tmp_path / "store"
    ours, theirs = out / "part-0-of-2", out / "part-1-of-2"
    for part in (ours, theirs):
        part.mkdir(parents=True)
        (part / "state.npy").write_bytes(b"x")
    (out / "store.json").write_text("{}")
    _remove_created(out, ours, (True, True))
    assert not ours.exists() and (theirs / "state.npy").exists() and (out / "store.json").exists()
    _remove_created(out, theirs, (True, True))
    assert (out / "store.json").exists()  # shared by the shards: another may be about to write its part
    single = tmp_path / "single"
    (single / "part-0-of-1").mkdir(parents=True)
    (single / "store.json").write_text("{}")
    _remove_created(single, single / "part-0-of-1", (True, True))  # unsharded: all of it was this run's
    assert not single.exists()


def test_workers_that_cannot_start_leave_no_store(corpus, tmp_path):
    # A script without `if __name__ == "__main__":` makes every spawned worker die at start-up.
    script = tmp_path / "no_main_guard.py"
    script.write_text(
        "from genreclf.featurize import featurize\n"
        f"featurize({str(corpus)!r}, {str(tmp_path / 's')!r}, workers=1, progress=False)\n"
    )
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "before finishing a single file" in run.stderr and '__name__ == "__main__"' in run.stderr
    assert not (tmp_path / "s").exists()  # the features file (25 GB for fma_large) is not left behind


def _write_level(path, dbfs, seconds=3.0, rate=44100, noise=False):
    """Write an MP3 whose RMS level is `dbfs` (a tone, or white noise); -inf writes digital silence."""
    n = int(seconds * rate)
    if dbfs == float("-inf"):
        x = np.zeros(n, np.float32)
    else:
        rng = np.random.default_rng(3)
        x = rng.standard_normal(n) if noise else np.sin(2 * np.pi * 330 * np.arange(n) / rate)
        x = (x / np.sqrt(np.mean(x**2)) * 10 ** (dbfs / 20)).astype(np.float32)
    import soundfile as sf

    sf.write(path, np.stack([x, x], 1), rate, format="MP3", subtype="MPEG_LAYER_III")


def test_silent_clips_are_failed_as_silent_and_counted(corpus, tmp_path):
    data = _copy_corpus(corpus, tmp_path)
    ids = load_fma(data / "fma_metadata").track_ids
    _write_level(audio_path(data / "fma_large", ids[0]), float("-inf"))  # digital silence
    _write_level(audio_path(data / "fma_large", ids[1]), -75.0, noise=True)  # a noise floor: near-silent
    _write_level(audio_path(data / "fma_large", ids[2]), -45.0)  # quiet but audible: kept
    result = featurize(data, tmp_path / "store", workers=2, progress=False)
    assert (result.done, result.failed, result.silent) == (28, 2, 2)
    store = FeatureStore.open(tmp_path / "store")
    reasons = dict(zip(store.failed["track_id"], store.failed["reason"]))
    assert set(reasons) == {int(ids[0]), int(ids[1])}
    assert all(
        r.startswith("silent (RMS level") and str(audio_path(data / "fma_large", 0)) not in r for r in reasons.values()
    )
    assert int(ids[2]) in set(store.track_ids)
    # --retry-failed tries them again, like any failure: still silent, still counted.
    again = featurize(data, tmp_path / "store", workers=1, retry_failed=True, progress=False)
    assert (again.done, again.failed, again.silent) == (28, 2, 2)


def test_rms_level_and_silence_threshold():
    t = np.arange(16000) / 16000
    sine = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    assert audio.rms_dbfs(sine) == pytest.approx(20 * np.log10(0.5 / np.sqrt(2)), abs=1e-3)
    assert audio.rms_dbfs(np.zeros(100, np.float32)) == float("-inf")
    assert audio.is_silent(np.zeros(100, np.float32))
    assert audio.is_silent(sine * 10 ** (-60 / 20))  # -69 dBFS RMS
    assert not audio.is_silent(sine * 10 ** (-40 / 20))  # -49 dBFS RMS


@pytest.mark.parametrize(
    "env, shard",
    [
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "4"}, (0, 1)),  # sbatch --ntasks=4 without srun: not a shard
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "4294967294"}, (0, 1)),  # the batch step
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"}, (1, 4)),  # srun's step 0
        ({"RANK": "2", "WORLD_SIZE": "3", "SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"}, (2, 3)),
    ],
)
def test_shard_from_env_trusts_slurm_only_under_srun(monkeypatch, env, shard):
    from genreclf.featurize import shard_from_env

    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert shard_from_env() == shard


def test_progress_in_a_log_file_is_lines_not_carriage_returns(corpus, tmp_path, capfd, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="genreclf"):
        featurize(corpus, tmp_path / "store", workers=1, progress=True)
    err = capfd.readouterr().err
    assert "\r" not in err  # stderr is not a terminal under pytest: no bar redraws
    assert any("featurize: 30/30 clips (100%)" in r.getMessage() and "ETA" in r.getMessage() for r in caplog.records)


def crash_on_track_3(job):
    """A featurize worker that dies on one file, as a decoder crashing on a corrupt MP3 would."""
    from genreclf.featurize import _work

    if job[1].endswith("003.mp3"):
        os._exit(1)
    return _work(job)


def hang_on_track_3(job):
    """A featurize worker whose decoder never returns on one file."""
    from genreclf.featurize import _work

    if job[1].endswith("003.mp3"):
        time.sleep(3600)
    return _work(job)


def always_die(job):
    """A featurize worker that never finishes a clip, as one that cannot start would."""
    os._exit(1)


def test_workers_that_never_finish_a_clip_stop_the_job(corpus):
    from genreclf.featurize import _failed_job
    from genreclf.pool import pool_map

    paths = sorted((corpus / "fma_large").rglob("*.mp3"))[:3]
    recorded = []
    with pytest.raises(GenreclfError, match="died 3 times before finishing a single file"):
        pool_map(
            [(row, str(p), 1.0, False) for row, p in enumerate(paths)], 1, recorded.append, always_die, _failed_job
        )
    assert recorded == []  # nothing blamed on the files: they stay pending for the next run


@pytest.mark.parametrize("n_jobs, workers", [(1, 1), (3, 1), (3, 3)])
def test_a_corrupt_first_file_is_blamed_not_the_workers(corpus, n_jobs, workers):
    # Before anything has worked, a death is not yet blamed on its file; one that kills two workers is.
    from genreclf.featurize import _failed_job
    from genreclf.pool import pool_map

    paths = [p for p in sorted((corpus / "fma_large").rglob("*.mp3")) if p.name.endswith("003.mp3")]
    paths += [p for p in sorted((corpus / "fma_large").rglob("*.mp3")) if not p.name.endswith("003.mp3")][:2]
    jobs = [(row, str(p), 1.0, False) for row, p in enumerate(paths[:n_jobs])]
    results = {}
    pool_map(jobs, workers, lambda r: results.setdefault(r[0], r), crash_on_track_3, _failed_job)
    assert sorted(results) == list(range(n_jobs))
    assert results[0][1] is None and "decoder crashed" in results[0][3]
    assert all(results[row][1] is not None for row in range(1, n_jobs))


@pytest.mark.parametrize("work, reason", [(crash_on_track_3, "decoder crashed"), (hang_on_track_3, "timed out")])
def test_a_worker_that_dies_or_hangs_fails_its_clip_and_the_job_goes_on(corpus, store_dir, work, reason):
    from genreclf.featurize import _failed_job
    from genreclf.pool import pool_map

    paths = sorted((corpus / "fma_large").rglob("*.mp3"))[:10]
    assert sum(p.name.endswith("003.mp3") for p in paths) == 1
    jobs = [(row, str(p), 1.0, False) for row, p in enumerate(paths)]
    results = {}
    t0 = time.monotonic()
    pool_map(jobs, 2, lambda r: results.setdefault(r[0], r), work, _failed_job, timeout=3.0)
    assert time.monotonic() - t0 < 60  # the hung clip cost its timeout, not the job
    assert sorted(results) == list(range(10))  # every clip exactly once, none lost with the dead worker
    failed = [row for row, (_, array, _, _, _) in results.items() if array is None]
    assert [paths[r].name for r in failed] == ["000003.mp3"]
    assert reason in results[failed[0]][3]
    store = FeatureStore.open(store_dir)
    for row, (_, array, _, _, _) in results.items():
        if array is not None:
            np.testing.assert_array_equal(array, store.features(int(paths[row].stem)))


def test_a_ctrl_c_while_a_worker_starts_does_not_kill_it(corpus):
    # A Ctrl-C reaches the whole process group, also a worker still importing (as one respawned after a crash).
    from genreclf.featurize import _work
    from genreclf.pool import Pool

    pool = Pool(1, _work, None)
    try:
        process = pool.workers[0].process
        os.kill(process.pid, signal.SIGINT)  # at once: the worker has not reached its own handler yet
        assert pool.workers[0].conn.poll(60) and pool.workers[0].conn.recv() == "ready"
        assert process.is_alive()
    finally:
        pool.close()


def test_a_worker_whose_parent_left_exits_quietly(capfd):
    # A parent stopped by Ctrl-C closes its pipes while a worker may still be starting: no traceback from it.
    from genreclf.featurize import _work
    from genreclf.pool import Pool

    pool = Pool(1, _work, None)
    worker = pool.workers[0]
    worker.conn.close()  # before the worker has said it is ready
    worker.process.join(60)
    assert worker.process.exitcode == 0
    assert "Traceback" not in capfd.readouterr().err


def test_subset_and_genres_all(corpus, tmp_path):
    featurize(corpus, tmp_path / "small", subset="small", labels="genres_all", workers=1, progress=False)
    store = FeatureStore.open(tmp_path / "small")
    labels = load_fma(corpus / "fma_metadata", labels="genres_all", subset="small")
    assert len(store) == len(labels) > 0
    assert store.header.subset == "small" and store.header.labels == "genres_all"
    plain = load_fma(corpus / "fma_metadata")
    # genres_all adds ancestors: never fewer labels than the track's own genres
    rows = plain.row_of(store.track_ids)
    assert (store.targets.sum(1) >= plain.targets[rows].sum(1)).all()
    assert isinstance(store.index, pd.DataFrame)


def test_shards_in_two_processes_equal_a_plain_run(corpus, store_dir, tmp_path):
    out = tmp_path / "sharded"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "genreclf",
                "-q",
                "featurize",
                "--data",
                str(corpus),
                "--out",
                str(out),
                "--workers",
                "1",
                "--shard",
                f"{k}/2",
            ],
            stderr=subprocess.PIPE,
        )
        for k in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    sharded, plain = FeatureStore.open(out), FeatureStore.open(store_dir)
    assert sharded.header.n_parts == 2
    np.testing.assert_array_equal(sharded.track_ids, plain.track_ids)
    np.testing.assert_array_equal(sharded.targets, plain.targets)
    np.testing.assert_array_equal(sharded.split, plain.split)
    for i in range(len(plain)):
        np.testing.assert_array_equal(sharded.item(i), plain.item(i))


def test_shards_may_read_the_corpus_from_different_mounts(corpus, store_dir, tmp_path):
    elsewhere = _copy_corpus(corpus, tmp_path / "other_machine")  # the same corpus under another path
    out = tmp_path / "sharded"
    featurize(corpus, out, shard=(0, 2), workers=1, progress=False)
    assert featurize(elsewhere, out, shard=(1, 2), workers=1, progress=False).complete
    sharded, plain = FeatureStore.open(out), FeatureStore.open(store_dir)
    np.testing.assert_array_equal(sharded.track_ids, plain.track_ids)
    np.testing.assert_array_equal(sharded.item(len(plain) - 1), plain.item(len(plain) - 1))


def test_one_shard_alone_is_not_a_readable_store(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")  # as under torchrun
    result = featurize(corpus, tmp_path / "s", workers=1, progress=False)
    assert not result.complete and result.tracks == 10
    assert (tmp_path / "s" / "part-1-of-3" / "part.json").exists()
    with pytest.raises(GenreclfError, match="part 1 of 3 is not finished"):
        FeatureStore.open(tmp_path / "s")


def test_batched_log_mel_path_matches_per_worker(corpus, store_dir, tmp_path):
    """The GPU layout (workers decode, the parent batches log-mel), run here on the CPU."""
    featurize(corpus, tmp_path / "batched", workers=2, device="cpu", progress=False)
    batched, plain = FeatureStore.open(tmp_path / "batched"), FeatureStore.open(store_dir)
    np.testing.assert_array_equal(batched.valid_frames, plain.valid_frames)
    for i in range(len(plain)):
        diff = np.abs(batched.item(i).astype(np.float32) - plain.item(i).astype(np.float32)).max()
        assert diff <= 1e-3
