"""FMA metadata: tracks.csv + genres.csv -> multi-hot genre labels, splits, artists, subsets."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from genreclf.errors import GenreclfError

log = logging.getLogger(__name__)

LABEL_COLUMNS = ("genres", "genres_all")  # ('track', X) columns that can serve as labels
SUBSETS = ("small", "medium", "large")  # FMA's nested subsets, smallest first
PARTS = ("training", "validation", "test")  # FMA's values of ('set', 'split'): the parts of a split
GENRE_COLUMNS = ("genre_id", "parent", "title", "top_level")  # genres.csv columns we need

# The tracks.csv columns load_fma reads (FMA writes 52; the rest are never parsed).
_NEEDED = (
    ("track", "genres"),
    ("track", "genres_all"),
    ("track", "genre_top"),
    ("set", "split"),
    ("set", "subset"),
    ("artist", "id"),
    ("album", "id"),
)
_GENRE_LIST = r"\[\s*(?:\d+\s*(?:,\s*\d+\s*)*)?\]"  # "[]", "[21]", "[76, 103]"


def _expected(name: str) -> str:
    return f"expected FMA's {name} from fma_metadata.zip (https://github.com/mdeff/fma)"


@dataclass(frozen=True, eq=False)
class Genres:
    """FMA's genre vocabulary in ascending genre_id order (163 genres for the real genres.csv)."""

    ids: np.ndarray  # int64 genre ids, ascending; the column order of every multi-hot matrix
    names: list[str]  # genre titles, e.g. "Hip-Hop"
    parents: np.ndarray  # int64 parent genre id, 0 for a root (top-level) genre
    top_level: np.ndarray  # int64 id of the root genre each genre descends from

    def __len__(self) -> int:
        return len(self.ids)

    def columns(self, genre_ids: np.ndarray) -> np.ndarray:
        """Return the vocabulary column of each genre id, -1 for ids not in the vocabulary."""
        genre_ids = np.asarray(genre_ids, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.ids, genre_ids), len(self.ids) - 1)
        return np.where(self.ids[pos] == genre_ids, pos, -1)

    def ancestors(self, genre_id: int) -> list[int]:
        """Return the ids of a genre's parent, grandparent, ... up to its root (nearest first)."""
        parent_of = dict(zip(self.ids.tolist(), self.parents.tolist()))
        out: list[int] = []
        parent = parent_of[int(genre_id)]
        while parent != 0 and parent not in out:
            out.append(parent)
            parent = parent_of.get(parent, 0)
        return out


@dataclass(frozen=True, eq=False)
class Labels:
    """Per-track genre targets and FMA bookkeeping, rows in tracks.csv order."""

    track_ids: np.ndarray  # int64 (n,)
    targets: np.ndarray  # uint8 (n, n_genres) multi-hot; an all-zero row = a track without genres
    genres: list[str]  # genre titles, the column order of targets
    genre_ids: np.ndarray  # int64 (n_genres,) ascending genre ids
    genre_parents: np.ndarray  # int64 (n_genres,) parent genre id, 0 for a root
    genre_top_level: np.ndarray  # int64 (n_genres,) root genre id
    split: np.ndarray  # str (n,) "training" / "validation" / "test"
    subset: np.ndarray  # str (n,) smallest FMA subset holding the track: small / medium / large
    artist_ids: np.ndarray  # int64 (n,)
    album_ids: np.ndarray  # int64 (n,), -1 where tracks.csv gives none
    genre_top: np.ndarray  # str (n,) FMA's single root genre title, "" when it has none
    label_column: str = "genres"  # which tracks.csv column the targets came from

    def __len__(self) -> int:
        return len(self.track_ids)

    @property
    def vocabulary(self) -> Genres:
        """Return the genre vocabulary of the target columns."""
        return Genres(self.genre_ids, self.genres, self.genre_parents, self.genre_top_level)

    def select(self, rows: np.ndarray) -> Labels:
        """Return the tracks picked by a boolean mask or an index array (same genre columns)."""
        rows = np.asarray(rows)
        per_track = ("track_ids", "targets", "split", "subset", "artist_ids", "album_ids", "genre_top")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update({name: values[name][rows] for name in per_track})
        return Labels(**values)

    def in_split(self, name: str) -> Labels:
        """Return the tracks of one split ("training", "validation" or "test")."""
        if name not in PARTS:
            raise GenreclfError(f"unknown split {name!r}: use one of {', '.join(PARTS)}")
        return self.select(self.split == name)

    def row_of(self, track_ids: np.ndarray) -> np.ndarray:
        """Return the row of each track id; a GenreclfError names the first unknown id."""
        track_ids = np.asarray(track_ids, dtype=np.int64)
        order = np.argsort(self.track_ids, kind="stable")
        known = self.track_ids[order]
        pos = np.searchsorted(known, track_ids)
        found = pos < len(known)
        found[found] = known[pos[found]] == track_ids[found]
        if not found.all():
            raise GenreclfError(f"track {int(track_ids[np.argmin(found)])} is not in the metadata")
        return order[pos]


def load_genres(path: str | Path | None = None) -> Genres:
    """Return the genre vocabulary of an FMA genres.csv (default: the packaged copy)."""
    if path is None:
        with resources.as_file(resources.files("genreclf") / "assets" / "genres.csv") as packaged:
            return _read_genres(Path(packaged))
    return _read_genres(Path(path))


def _read_genres(path: Path) -> Genres:
    if not path.is_file():
        raise GenreclfError(f"{path} not found: {_expected('genres.csv')}")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise _unreadable(path, "genres.csv", e) from None
    missing = [c for c in GENRE_COLUMNS if c not in table.columns]
    if missing or table.empty:
        what = f"no column(s) {', '.join(missing)}" if missing else "no genres"
        header = ",".join(GENRE_COLUMNS)
        raise GenreclfError(f"{path} has {what}: expected FMA's genres.csv with columns {header}")
    ids, parents, top = (_genre_ints(table, c, path) for c in ("genre_id", "parent", "top_level"))
    if len(np.unique(ids)) != len(ids):
        raise GenreclfError(f"{path} lists a genre id twice: expected FMA's genres.csv")
    order = np.argsort(ids, kind="stable")
    names = table["title"].fillna("").astype(str).to_numpy()[order].tolist()
    return Genres(ids[order], names, parents[order], top[order])


def _genre_ints(table: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    """Parse a genres.csv column of integers ("2" or "2.0"); blank or fractional cells are an error."""
    numbers, row = _parse_ints(table[column].to_numpy())
    if row is not None:
        raise GenreclfError(
            f"{path}: line {row + 2} has {column} {str(table[column].iloc[row])!r}, expected an "
            "integer; is this FMA's genres.csv?"
        )
    return numbers


def load_fma(metadata_dir: str | Path, labels: str = "genres", subset: str | None = None) -> Labels:
    """Return the Labels of FMA's tracks.csv and genres.csv in metadata_dir (or of that tracks.csv file).

    labels: "genres" (the tags given to a track, the reference recipe) or "genres_all"
    (those plus all their ancestors). subset: None or "full" for every track, else
    "small", "medium" or "large", which FMA nests (medium holds small, large holds both).
    Tracks without any genre are kept with an all-zero target row.
    """
    if labels not in LABEL_COLUMNS:
        raise GenreclfError(f"unknown labels {labels!r}: use one of {', '.join(LABEL_COLUMNS)}")
    if subset not in (None, "full", *SUBSETS):
        raise GenreclfError(f"unknown subset {subset!r}: use one of {', '.join(SUBSETS)}, full")
    metadata_dir = Path(metadata_dir)
    if not metadata_dir.exists():
        raise GenreclfError(
            f"metadata folder {metadata_dir} not found: pass the folder holding FMA's tracks.csv and "
            "genres.csv (fma_metadata/ from fma_metadata.zip, https://github.com/mdeff/fma)"
        )
    tracks_csv = metadata_dir if metadata_dir.is_file() else metadata_dir / "tracks.csv"
    genres_csv = tracks_csv.parent / "genres.csv"
    if genres_csv.is_file():
        vocabulary = load_genres(genres_csv)
    else:
        log.warning("%s not found; using the genre list packaged with genreclf", genres_csv)
        vocabulary = load_genres()

    table = _read_tracks(tracks_csv)
    track_ids = _int_column(table.index.to_numpy(), tracks_csv, "track_id", table.index.to_numpy())
    unique, counts = np.unique(track_ids, return_counts=True)
    if (counts > 1).any():
        raise GenreclfError(
            f"{tracks_csv}: track {unique[np.argmax(counts > 1)]} is listed "
            f"{counts.max()} times; each track must appear once (is the file concatenated?)"
        )
    split = table[("set", "split")].to_numpy(dtype=str)
    subsets = table[("set", "subset")].to_numpy(dtype=str)
    for column, values, allowed in (("split", split, PARTS), ("subset", subsets, SUBSETS)):
        bad = ~np.isin(values, allowed)
        if bad.any():
            row = int(np.argmax(bad))
            raise GenreclfError(
                f"{tracks_csv}: track {track_ids[row]} has set {column} {str(values[row])!r}, "
                f"expected one of {', '.join(allowed)}"
            )
    if subset in SUBSETS:
        keep = np.isin(subsets, SUBSETS[: SUBSETS.index(subset) + 1])
        table, track_ids, split, subsets = table[keep], track_ids[keep], split[keep], subsets[keep]

    targets = _multi_hot(table[("track", labels)], track_ids, vocabulary, tracks_csv, labels)
    return Labels(
        track_ids=track_ids,
        targets=targets,
        genres=list(vocabulary.names),
        genre_ids=vocabulary.ids,
        genre_parents=vocabulary.parents,
        genre_top_level=vocabulary.top_level,
        split=split,
        subset=subsets,
        artist_ids=_int_column(table[("artist", "id")].to_numpy(), tracks_csv, "artist id", track_ids),
        album_ids=_int_column(table[("album", "id")].to_numpy(), tracks_csv, "album id", track_ids, -1),
        genre_top=table[("track", "genre_top")].to_numpy(dtype=str),
        label_column=labels,
    )


def _read_tracks(path: Path) -> pd.DataFrame:
    """Read the needed columns of FMA's tracks.csv (3 header rows) as strings."""
    if not path.is_file():
        raise GenreclfError(f"{path} not found: {_expected('tracks.csv')}")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            groups, names, index_row = (next(reader, []) for _ in range(3))
    except (UnicodeDecodeError, csv.Error) as e:
        raise _unreadable(path, "tracks.csv", e) from None
    columns = list(zip(groups[1:], names[1:]))
    missing = [f"{a}.{b}" for a, b in _NEEDED if (a, b) not in columns]
    if missing or not index_row or index_row[0] != "track_id":
        what = f"lacks column(s) {', '.join(missing)}" if missing else "has no track_id header row"
        raise GenreclfError(f"{path} {what}, so it is not FMA's tracks.csv: {_expected('tracks.csv')}")
    usecols = [0] + sorted(columns.index(c) + 1 for c in _NEEDED)  # pandas keeps file order
    try:
        table = pd.read_csv(
            path,
            header=None,
            skiprows=3,
            usecols=usecols,
            index_col=0,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            encoding="utf-8",
            engine="c",
        )
    except pd.errors.EmptyDataError:  # a ValueError too, so caught first
        raise GenreclfError(f"{path} has a header but no tracks: {_expected('tracks.csv')}") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise _unreadable(path, "tracks.csv", e) from None
    table.columns = pd.MultiIndex.from_tuples([columns[i - 1] for i in usecols[1:]])
    return table


def _int_column(
    values: np.ndarray, path: Path, what: str, track_ids: np.ndarray, missing: int | None = None
) -> np.ndarray:
    """Parse integer strings such as "2" or "2.0"; empty cells become `missing`, else are an error."""
    numbers, row = _parse_ints(values, missing)
    if row is not None:
        raise GenreclfError(
            f"{path}: track {track_ids[row]} has {what} {str(values[row])!r}, "
            "expected an integer; is this FMA's tracks.csv?"
        )
    return numbers


def _parse_ints(values: np.ndarray, missing: int | None = None) -> tuple[np.ndarray, int | None]:
    """Return (int64 values, None), or (_, the first row that is not a whole number).

    Accepts "2" and "2.0"; empty cells become `missing` when it is given, else are bad.
    """
    text = pd.Series(values, dtype=str).str.strip()
    numbers = pd.to_numeric(text.replace("", np.nan), errors="coerce").to_numpy(dtype=np.float64, copy=True)
    if missing is not None:
        numbers[(text == "").to_numpy()] = missing
    bad = ~(numbers == np.floor(numbers))  # also catches NaN: empty or not a number
    if bad.any():
        return numbers, int(np.argmax(bad))
    return numbers.astype(np.int64), None


def _multi_hot(column: pd.Series, track_ids: np.ndarray, vocabulary: Genres, path: Path, labels: str) -> np.ndarray:
    """Turn list literals such as "[76, 103]" into a uint8 multi-hot matrix."""
    texts = column.to_numpy(dtype=str)  # an empty cell is an error too: FMA writes "[]"
    ok = pd.Series(texts, dtype=str).str.fullmatch(_GENRE_LIST).to_numpy(dtype=bool)
    if not ok.all():
        row = int(np.argmin(ok))
        raise GenreclfError(
            f"{path}: track {track_ids[row]} has {labels} {str(texts[row])!r}, "
            "expected a list of genre ids like [76, 103]"
        )
    inner = [t[1:-1] for t in texts]
    counts = np.array([0 if not s.strip() else s.count(",") + 1 for s in inner], dtype=np.int64)
    flat = ",".join(s for s in inner if s.strip())
    genre_ids = np.array(flat.split(","), dtype=np.int64) if flat else np.zeros(0, dtype=np.int64)
    rows = np.repeat(np.arange(len(texts)), counts)
    cols = vocabulary.columns(genre_ids)
    if (cols < 0).any():
        bad = int(np.argmax(cols < 0))
        raise GenreclfError(
            f"{path}: track {track_ids[rows[bad]]} has genre id {genre_ids[bad]}, which is not in "
            "genres.csv; use the genres.csv that came with this tracks.csv"
        )
    targets = np.zeros((len(texts), len(vocabulary)), dtype=np.uint8)
    targets[rows, cols] = 1
    return targets


def reference_split(
    track_ids: np.ndarray, seed: int = 0, test_fraction: float = 0.2, validation_fraction: float = 0.1
) -> np.ndarray:
    """Return "training"/"validation"/"test" per track: a seeded random split, like the reference study.

    Each track's part is drawn from a hash of (seed, track id) alone, so a track lands in the
    same part whatever other tracks are present: a model trained on one store can never meet
    its training tracks in the test part of another store. About test_fraction of the tracks
    are test, and validation_fraction of the rest validation.
    """
    if not (0.0 <= test_fraction < 1.0 and 0.0 <= validation_fraction < 1.0):
        raise GenreclfError(
            f"split fractions must lie in [0, 1): got test {test_fraction}, validation {validation_fraction}"
        )
    track_ids = np.asarray(track_ids, dtype=np.int64)
    if len(np.unique(track_ids)) != len(track_ids):
        raise GenreclfError("reference_split needs distinct track ids; remove the duplicates")
    u = _uniform_hash(track_ids, seed)
    parts = np.full(len(track_ids), "training", dtype="<U10")
    parts[u < test_fraction + (1.0 - test_fraction) * validation_fraction] = "validation"
    parts[u < test_fraction] = "test"
    return parts


def _uniform_hash(values: np.ndarray, seed: int) -> np.ndarray:
    """Return a float in [0, 1) per value, uniform and independent across values (splitmix64)."""
    with np.errstate(over="ignore"):
        x = values.astype(np.uint64) + np.uint64(seed % 2**64) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / 2.0**53


def audio_path(audio_dir: str | Path, track_id: int) -> Path:
    """Return where FMA stores a track's MP3: audio_dir/AAA/AAABBB.mp3 (id zero-padded to 6 digits)."""
    name = f"{int(track_id):06d}"
    return Path(audio_dir) / name[:3] / f"{name}.mp3"


def _unreadable(path: Path, name: str, error: BaseException) -> GenreclfError:
    reason = " ".join(str(error).split())  # one line, however the parser formats it
    return GenreclfError(f"{path} is not a readable {name} ({reason}): {_expected(name)}")
