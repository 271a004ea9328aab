"""synth.py: a small synthetic corpus in FMA's real formats, read back by pandas, soundfile and load_fma."""

import ast
import csv
import dataclasses
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from genreclf.errors import GenreclfError
from genreclf.metadata import audio_path, load_fma, load_genres
from genreclf.synth import SYNTH_GENRES, ClipSpec, make_corpus, palette_of, render, synth_metadata

DATA = Path(__file__).parent / "data"
N_TRACKS, SECONDS = 12, 2.0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("synth"), N_TRACKS, seconds=SECONDS, seed=0, workers=1)


def read_tracks(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "fma_metadata" / "tracks.csv", index_col=0, header=[0, 1])


def test_tracks_csv_has_fma_layout(corpus: Path):
    ours, fma = read_tracks(corpus), pd.read_csv(DATA / "tracks_head.csv", index_col=0, header=[0, 1])
    assert list(ours.columns) == list(fma.columns) and len(ours.columns) == 52
    assert ours.index.name == "track_id" and len(ours) == N_TRACKS
    headers = []
    for path in (corpus / "fma_metadata" / "tracks.csv", DATA / "tracks_head.csv"):
        with open(path, newline="") as f:
            reader = csv.reader(f)
            headers.append([next(reader) for _ in range(3)])
    assert headers[0] == headers[1]
    ids = ours.index.to_numpy()
    assert ids[0] == 2 and np.all(np.diff(ids) > 0) and ids[-1] > ids[0] + N_TRACKS - 1  # FMA-like gaps
    assert set(ours[("track", "bit_rate")]) <= {256000, 320000}
    assert ours[("artist", "members")].str.contains("\n").any()  # quoted newlines, as in FMA
    for column in ("genres", "genres_all", "tags"):
        assert all(isinstance(ast.literal_eval(text), list) for text in ours[("track", column)])


def test_genres_csv_is_the_packaged_copy(corpus: Path):
    packaged = resources.files("genreclf") / "assets" / "genres.csv"
    assert (corpus / "fma_metadata" / "genres.csv").read_bytes() == packaged.read_bytes()


def test_load_fma_reads_the_corpus(corpus: Path):
    table = read_tracks(corpus)
    genres = load_genres()
    for column in ("genres", "genres_all"):
        labels = load_fma(corpus / "fma_metadata", labels=column)
        assert labels.targets.shape == (N_TRACKS, 163)
        for row, text in enumerate(table[("track", column)]):
            ids = ast.literal_eval(text)
            assert set(labels.genre_ids[labels.targets[row] == 1]) == set(ids)
    assert np.array_equal(labels.track_ids, table.index.to_numpy())
    used = set(labels.genre_ids[labels.targets.any(axis=0)])
    assert used - {g for s in SYNTH_GENRES for g in [s, *genres.ancestors(s)]} == set()


def test_hierarchy_and_genre_top(corpus: Path):
    table = read_tracks(corpus)
    genres = load_genres()
    title = dict(zip(genres.ids.tolist(), genres.names))
    root = dict(zip(genres.ids.tolist(), genres.top_level.tolist()))
    for _, track in table["track"].iterrows():
        mine, every = ast.literal_eval(track["genres"]), ast.literal_eval(track["genres_all"])
        assert 0 <= len(mine) <= 3 and mine == sorted(mine)
        assert set(every) == set(mine).union(*(genres.ancestors(g) for g in mine))
        roots = {root[g] for g in mine}
        expected = title[roots.pop()] if len(roots) == 1 else np.nan
        assert track["genre_top"] == expected or (pd.isna(track["genre_top"]) and pd.isna(expected))


def test_splits_by_artist_and_nested_subsets(corpus: Path):
    labels = load_fma(corpus / "fma_metadata")
    for artist in np.unique(labels.artist_ids):
        assert len(set(labels.split[labels.artist_ids == artist])) == 1
    assert len(np.unique(labels.artist_ids)) < N_TRACKS  # artists have several tracks
    assert set(labels.split) <= {"training", "validation", "test"}
    # As in FMA, the small and medium subsets hold only tracks with a genre_top.
    assert (labels.genre_top[labels.subset != "large"] != "").all()
    small, medium = (set(load_fma(corpus / "fma_metadata", subset=s).track_ids) for s in ("small", "medium"))
    assert small <= medium <= set(labels.track_ids)


def test_split_proportions_at_demo_size():
    table, _ = synth_metadata(300, 10.0, 0, load_genres())
    shares = table[("set", "split")].value_counts(normalize=True)
    assert abs(shares["training"] - 0.8) < 0.03 and abs(shares["test"] - 0.1) < 0.03
    tags = [g for text in table[("track", "genres")] for g in ast.literal_eval(text)]
    counts = pd.Series(tags).value_counts()
    assert len(counts) >= 20 and counts.iloc[0] >= 3 * counts.iloc[-1]  # many genres, imbalanced


def test_audio_files_are_fma_mp3s(corpus: Path):
    labels = load_fma(corpus / "fma_metadata")
    files = sorted((corpus / "fma_large").rglob("*"))
    expected = {audio_path(corpus / "fma_large", t) for t in labels.track_ids}
    assert {p for p in files if p.is_file()} == expected
    for track_id in labels.track_ids[:4]:
        info = sf.info(str(audio_path(corpus / "fma_large", track_id)))
        assert (info.format, info.samplerate, info.channels) == ("MP3", 44100, 2)
        assert abs(info.duration - SECONDS) < 0.05
        audio, _ = sf.read(str(audio_path(corpus / "fma_large", track_id)), dtype="float32")
        assert 0.05 < np.abs(audio).max() <= 1.0 and not np.allclose(audio[:, 0], audio[:, 1])


def test_same_seed_same_bytes_whatever_the_workers(tmp_path: Path):
    one = make_corpus(tmp_path / "one", 4, seconds=0.5, seed=3, workers=1)
    two = make_corpus(tmp_path / "two", 4, seconds=0.5, seed=3, workers=2)
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    assert len(files) == 6
    for name in files:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_another_seed_gives_another_corpus():
    genres = load_genres()
    (a, specs_a), (b, specs_b) = (synth_metadata(N_TRACKS, SECONDS, seed, genres) for seed in (0, 1))
    assert not a.equals(b)
    clip_a = render(specs_a[0], genres, 16000)
    clip_b = render(dataclasses.replace(specs_a[0], seed=1), genres, 16000)
    assert clip_a.shape == clip_b.shape == (32000, 2) and not np.allclose(clip_a, clip_b)
    assert np.array_equal(clip_a, render(specs_a[0], genres, 16000))


def band_profile(clip: np.ndarray, rate: int) -> np.ndarray:
    """Mean and spread over time of log energy in 32 log-spaced bands: a crude log-mel summary."""
    n = 1024
    mono = clip.mean(axis=1)
    frames = mono[: len(mono) // n * n].reshape(-1, n) * np.hanning(n)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    freqs, edges = np.fft.rfftfreq(n, 1 / rate), np.geomspace(60, rate / 2, 33)
    bands = np.stack([power[:, (freqs >= lo) & (freqs < hi)].sum(axis=1) for lo, hi in zip(edges, edges[1:])], axis=1)
    logs = np.log(bands + 1e-8)
    logs -= logs.max()
    return np.concatenate([logs.mean(axis=0), logs.std(axis=0)])


def test_genres_are_audible():
    """Clips of one genre (different artists, detunings, noise) resemble each other more than other genres."""
    genres, rng = load_genres(), np.random.default_rng(1)
    classes = (12, 25, 66, 27)  # Rock and three of its sub-genres: same root register and tempo
    profiles, truth = [], []
    for label, genre_id in enumerate(classes):
        for k in range(8):
            voice = rng.uniform(-2, 2), rng.uniform(0.92, 1.08), rng.uniform(-0.3, 0.3)
            clip = render(ClipSpec(1000 + 100 * label + k, (genre_id,), SECONDS, 0, *voice), genres, 16000)
            profiles.append(band_profile(clip, 16000))
            truth.append(label)
    x, y = np.array(profiles), np.array(truth)
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-9)
    hits = 0
    for i in range(len(y)):  # leave-one-out nearest centroid
        others = np.arange(len(y)) != i
        centroids = np.stack([x[others & (y == c)].mean(axis=0) for c in range(len(classes))])
        hits += np.argmin(((centroids - x[i]) ** 2).sum(axis=1)) == y[i]
    assert hits / len(y) >= 0.6  # chance is 0.25


def test_bad_requests(tmp_path: Path):
    with pytest.raises(GenreclfError, match="at least one track"):
        make_corpus(tmp_path, 0)
    with pytest.raises(GenreclfError, match="channels"):
        make_corpus(tmp_path, 2, seconds=1.0, channels=6)
    with pytest.raises(GenreclfError, match="rates"):
        make_corpus(tmp_path, 2, seconds=1.0, sample_rate=44000)


def _genre_shares(table: pd.DataFrame) -> np.ndarray:
    """Each used genre's share of the tracks (as its `genres` column lists it), largest first."""
    counts: dict[int, int] = {}
    for value in table[("track", "genres")]:
        for genre in ast.literal_eval(value) if isinstance(value, str) else value:
            counts[genre] = counts.get(genre, 0) + 1
    return np.sort(np.array(list(counts.values())))[::-1] / len(table)


def test_a_long_tailed_corpus_as_fma_is():
    genres = load_genres()
    default, _ = synth_metadata(300, 10.0, 0, genres)
    explicit, _ = synth_metadata(300, 10.0, 0, genres, n_genres=None, zipf=0.6)
    pd.testing.assert_frame_equal(default, explicit)  # the demo's corpus is unchanged by the options
    assert len(_genre_shares(default)) == len(SYNTH_GENRES)
    shares = _genre_shares(synth_metadata(800, 10.0, 0, genres, n_genres=99, zipf=1.0)[0])
    assert 0.15 < shares[0] < 0.35  # FMA: the top genre on 23% of tracks
    assert len(shares) > 60 and (shares < 0.01).sum() >= 30  # a long tail of rare genres
    palette = palette_of(genres, 40)
    assert list(palette[: len(SYNTH_GENRES)]) == list(SYNTH_GENRES) and len(set(palette.tolist())) == 40
    roots = set(genres.top_level[genres.columns(np.array(SYNTH_GENRES))].tolist())
    assert set(genres.top_level[genres.columns(palette)].tolist()) == roots  # the tree stays audible
    used = synth_metadata(200, 10.0, 0, genres, n_genres=40)[0]
    ids = {g for v in used[("track", "genres")] for g in ast.literal_eval(v)}
    assert ids <= set(palette.tolist()) and len(ids) > len(SYNTH_GENRES)
    with pytest.raises(GenreclfError, match="a corpus can use 1 to 99 genres, not 500"):
        synth_metadata(10, 10.0, 0, genres, n_genres=500)
