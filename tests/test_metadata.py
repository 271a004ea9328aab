"""metadata.py on the first 682 tracks of FMA's real tracks.csv (tests/data/tracks_head.csv)."""

import ast
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from genreclf.errors import GenreclfError
from genreclf.metadata import audio_path, load_fma, load_genres, reference_split

DATA = Path(__file__).parent / "data"


@pytest.fixture
def fma_dir(tmp_path: Path) -> Path:
    """A folder laid out like fma_metadata/: the real tracks.csv head and genres.csv."""
    shutil.copyfile(DATA / "tracks_head.csv", tmp_path / "tracks.csv")
    shutil.copyfile(DATA / "genres.csv", tmp_path / "genres.csv")
    return tmp_path


def genres_of(labels, track_id: int) -> set[str]:
    row = labels.row_of([track_id])[0]
    return {labels.genres[j] for j in np.flatnonzero(labels.targets[row])}


def test_genre_vocabulary():
    genres = load_genres()
    assert len(genres) == 163 and genres.ids.dtype == np.int64
    assert np.all(np.diff(genres.ids) > 0)
    assert genres.ids[0] == 1 and genres.names[0] == "Avant-Garde" and genres.ids[-1] == 1235
    col = genres.columns(np.array([21, 89, 1235, 99999]))
    assert [genres.names[c] for c in col[:3]] == ["Hip-Hop", "Post-Punk", "Instrumental"]
    assert col[3] == -1
    assert genres.parents[col[1]] == 25 and genres.top_level[col[1]] == 12
    assert genres.ancestors(89) == [25, 12] and genres.ancestors(12) == []
    assert (genres.top_level[genres.parents == 0] == genres.ids[genres.parents == 0]).all()
    assert (genres.parents == 0).sum() == 16
    packaged, copy = load_genres(), load_genres(DATA / "genres.csv")
    assert np.array_equal(packaged.ids, copy.ids) and packaged.names == copy.names


def test_counts_match_the_csv(fma_dir: Path):
    labels = load_fma(fma_dir)
    assert len(labels) == 682 and labels.targets.shape == (682, 163)
    assert labels.targets.dtype == np.uint8 and labels.track_ids.dtype == np.int64
    assert labels.track_ids[0] == 2 and labels.track_ids[-1] == 932
    assert dict(zip(*np.unique(labels.split, return_counts=True))) == {"training": 563, "validation": 48, "test": 71}
    assert dict(zip(*np.unique(labels.subset, return_counts=True))) == {"large": 488, "medium": 136, "small": 58}
    assert len(np.unique(labels.artist_ids)) == 84
    assert (labels.genre_top == "").sum() == 51
    empty = labels.track_ids[labels.targets.sum(axis=1) == 0]
    assert empty.tolist() == [613]  # the one track with genres "[]" is kept, with no target
    assert labels.genres == load_genres().names and labels.label_column == "genres"


def test_subsets_nest(fma_dir: Path):
    sizes = {s: len(load_fma(fma_dir, subset=s)) for s in (None, "full", "large", "medium", "small")}
    assert sizes == {None: 682, "full": 682, "large": 682, "medium": 194, "small": 58}
    small, medium = load_fma(fma_dir, subset="small"), load_fma(fma_dir, subset="medium")
    assert set(small.track_ids) < set(medium.track_ids)
    assert set(np.unique(medium.subset)) == {"small", "medium"}


def test_targets_equal_the_list_literals(fma_dir: Path):
    table = pd.read_csv(fma_dir / "tracks.csv", index_col=0, header=[0, 1])
    for column in ("genres", "genres_all"):
        labels = load_fma(fma_dir, labels=column)
        expected = np.zeros_like(labels.targets)
        for row, text in enumerate(table[("track", column)]):
            expected[row, labels.vocabulary.columns(np.array(ast.literal_eval(text), dtype=np.int64))] = 1
        assert np.array_equal(labels.targets, expected), column
    assert np.array_equal(labels.artist_ids, table[("artist", "id")].to_numpy())
    assert np.array_equal(labels.album_ids, table[("album", "id")].to_numpy())


def test_spot_checked_tracks(fma_dir: Path):
    tags, every = load_fma(fma_dir), load_fma(fma_dir, labels="genres_all")
    assert genres_of(tags, 2) == genres_of(every, 2) == {"Hip-Hop"}
    row = tags.row_of([2])[0]
    assert tags.genre_top[row] == "Hip-Hop" and tags.artist_ids[row] == 1 and tags.album_ids[row] == 1
    # Track 20: [76, 103] -> genres_all [17, 10, 76, 103]; two roots, so no genre_top.
    assert genres_of(tags, 20) == {"Experimental Pop", "Singer-Songwriter"}
    assert genres_of(every, 20) == {"Experimental Pop", "Singer-Songwriter", "Pop", "Folk"}
    assert tags.genre_top[tags.row_of([20])[0]] == ""
    # Track 135: [45, 58] -> [58, 12, 45]; one root, Rock.
    assert genres_of(tags, 135) == {"Loud-Rock", "Psych-Rock"}
    assert genres_of(every, 135) == {"Loud-Rock", "Psych-Rock", "Rock"}
    assert tags.genre_top[tags.row_of([135])[0]] == "Rock"


def test_genres_all_holds_every_ancestor(fma_dir: Path):
    tags, every = load_fma(fma_dir), load_fma(fma_dir, labels="genres_all")
    assert (every.targets >= tags.targets).all()
    vocab = tags.vocabulary
    for row in range(len(tags)):
        for genre_id in tags.genre_ids[tags.targets[row] == 1]:
            assert every.targets[row, vocab.columns(np.array(vocab.ancestors(genre_id)))].all()


def test_select_split_and_rows(fma_dir: Path):
    labels = load_fma(fma_dir)
    test = labels.in_split("test")
    assert len(test) == 71 and set(test.split) == {"test"} and test.targets.shape == (71, 163)
    picked = labels.select(np.array([2, 0]))
    assert picked.track_ids.tolist() == [5, 2] and picked.genres is labels.genres
    assert labels.row_of([932, 2]).tolist() == [681, 0]
    with pytest.raises(GenreclfError, match="track 4 "):
        labels.row_of([2, 4])
    with pytest.raises(GenreclfError, match="unknown split"):
        labels.in_split("train")


def test_missing_genres_csv_falls_back_to_packaged(fma_dir: Path, caplog):
    (fma_dir / "genres.csv").unlink()
    with caplog.at_level(logging.WARNING, logger="genreclf.metadata"):
        labels = load_fma(fma_dir)
    assert "genres.csv" in caplog.text and labels.targets.shape == (682, 163)


def test_tracks_csv_path_is_accepted(fma_dir: Path):
    assert len(load_fma(fma_dir / "tracks.csv")) == 682


def test_bad_arguments(fma_dir: Path):
    with pytest.raises(GenreclfError, match="unknown labels"):
        load_fma(fma_dir, labels="genre_top")
    with pytest.raises(GenreclfError, match="unknown subset"):
        load_fma(fma_dir, subset="tiny")


def test_missing_files(tmp_path: Path, fma_dir: Path):
    with pytest.raises(GenreclfError, match="metadata folder .* not found"):
        load_fma(tmp_path / "nowhere")
    (fma_dir / "tracks.csv").unlink()
    with pytest.raises(GenreclfError, match="tracks.csv not found: expected FMA's tracks.csv"):
        load_fma(fma_dir)
    with pytest.raises(GenreclfError, match="not found"):
        load_genres(tmp_path / "elsewhere" / "genres.csv")


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


@pytest.mark.parametrize(
    "old, new, message",
    [
        (",Hip-Hop,[21],[21],", ",Hip-Hop,[99999],[21],", r"track 2 has genre id 99999, which is not in"),
        (",Hip-Hop,[21],[21],", ",Hip-Hop,Hip-Hop,[21],", r"track 2 has genres 'Hip-Hop', expected a list"),
        (",training,small,256000,", ",train,small,256000,", r"track 2 has set split 'train'"),
        ("track_id,,,", "id,,,", r"has no track_id header row"),
        (",genre_top,genres,", ",genre_top,genre_list,", r"lacks column\(s\) track.genres"),
    ],
)
def test_malformed_tracks_csv(fma_dir: Path, old: str, new: str, message: str):
    edit(fma_dir / "tracks.csv", old, new)
    with pytest.raises(GenreclfError, match=message) as caught:
        load_fma(fma_dir)
    assert "\n" not in str(caught.value)


def test_not_a_tracks_csv(fma_dir: Path):
    shutil.copyfile(fma_dir / "genres.csv", fma_dir / "tracks.csv")
    with pytest.raises(GenreclfError, match="not FMA's tracks.csv"):
        load_fma(fma_dir)
    (fma_dir / "tracks.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(GenreclfError, match="not a readable tracks.csv"):
        load_fma(fma_dir)
    header = "".join((DATA / "tracks_head.csv").read_text(encoding="utf-8").splitlines(keepends=True)[:3])
    (fma_dir / "tracks.csv").write_text(header, encoding="utf-8")
    with pytest.raises(GenreclfError, match="no tracks"):
        load_fma(fma_dir)


def test_truncated_tracks_csv(fma_dir: Path):
    raw = (DATA / "tracks_head.csv").read_bytes()
    (fma_dir / "tracks.csv").write_bytes(raw[: raw.index(b"<p>A Way Of Life") + 5])  # inside a quoted field
    with pytest.raises(GenreclfError, match="tracks.csv"):
        load_fma(fma_dir)


def test_malformed_genres_csv(fma_dir: Path):
    (fma_dir / "genres.csv").write_text("id,name\n1,Rock\n", encoding="utf-8")
    with pytest.raises(GenreclfError, match="genres.csv with columns genre_id"):
        load_fma(fma_dir)


@pytest.mark.parametrize(
    "old, new, column",
    [
        ("1,8693,38,Avant-Garde,38", "1,8693,,Avant-Garde,38", "parent"),
        ("1,8693,38,Avant-Garde,38", "1.7,8693,38,Avant-Garde,38", "genre_id"),
    ],
)
def test_genres_csv_with_blank_or_fractional_ids(fma_dir: Path, old: str, new: str, column: str):
    edit(fma_dir / "genres.csv", old, new)
    with pytest.raises(GenreclfError, match=f"line 2 has {column} .*expected an integer"):
        load_fma(fma_dir)


def test_a_track_listed_twice_is_refused(fma_dir: Path):
    lines = (fma_dir / "tracks.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (fma_dir / "tracks.csv").write_text("".join(lines + [lines[3]]), encoding="utf-8")  # track 2 again, at the end
    with pytest.raises(GenreclfError, match="track 2 is listed 2 times"):
        load_fma(fma_dir)


def test_reference_split():
    ids = np.arange(2, 2002) * 3
    split = reference_split(ids, seed=0)
    counts = dict(zip(*np.unique(split, return_counts=True)))
    # 2000 tracks: 400 test, 160 validation, 1440 training expected; binomial spread ~ +-3 sd
    assert abs(counts["test"] - 400) < 54 and abs(counts["validation"] - 160) < 36
    # A track's part does not depend on which other tracks are split with it.
    subset = ids[::7]
    assert np.array_equal(reference_split(subset, seed=0), split[::7])
    assert np.array_equal(split, reference_split(ids, seed=0))
    assert not np.array_equal(split, reference_split(ids, seed=1))
    order = np.random.default_rng(5).permutation(len(ids))
    assert np.array_equal(reference_split(ids[order], seed=0), split[order])
    assert reference_split(ids, validation_fraction=0.0).tolist().count("validation") == 0
    assert len(reference_split(np.array([], dtype=np.int64))) == 0
    with pytest.raises(GenreclfError, match="fractions"):
        reference_split(ids, test_fraction=1.5)
    with pytest.raises(GenreclfError, match="distinct"):
        reference_split(np.array([2, 2, 3]))


def test_audio_path():
    assert audio_path("fma_large", 2) == Path("fma_large/000/000002.mp3")
    assert audio_path(Path("/data/fma"), 155066) == Path("/data/fma/155/155066.mp3")
    assert audio_path("a", np.int64(1234)) == Path("a/001/001234.mp3")
