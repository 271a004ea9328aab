"""The feature store: one directory per featurized corpus, memory-mapped for reading.

Layout (every file is written atomically; a part is complete only once `part.json` exists):

    STORE/store.json                 signal settings, genre vocabulary, label source, number of parts
    STORE/part-K-of-N/plan.csv       row, track_id, split, artist_id, genre_top, path (every planned track)
    STORE/part-K-of-N/targets.npy    uint8 (rows, genres) multi-hot targets
    STORE/part-K-of-N/features.npy   float16 (rows, 938, 128) log-mel features (npy, memory-mapped)
    STORE/part-K-of-N/state.npy      int32 (rows,): 0 pending, -1 failed, >0 valid frames
    STORE/part-K-of-N/failed.csv     track_id, path, reason (appended as failures happen)
    STORE/part-K-of-N/part.json      written last: counts; marks the part complete

A killed writer leaves `state.npy` saying which rows are done; the next run skips them.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from genreclf.atomic import atomic_save_npy, atomic_write_text
from genreclf.audio import SignalConfig
from genreclf.errors import GenreclfError

if TYPE_CHECKING:  # annotations only
    from genreclf.metadata import Genres

STORE_FORMAT = "genreclf-feature-store"
STORE_VERSION = 1
PENDING, FAILED = 0, -1


def part_name(shard: int, n_shards: int) -> str:
    """Return the folder name of part `shard` of `n_shards`."""
    return f"part-{shard}-of-{n_shards}"


@dataclass(frozen=True)
class StoreHeader:
    """What every part of a store shares (store.json)."""

    signal: SignalConfig
    genres: list[str]
    genre_ids: list[int]
    genre_parents: list[int]
    genre_top_level: list[int]
    labels: str  # "genres" or "genres_all"
    subset: str  # FMA subset the tracks were selected from
    n_parts: int
    source: str  # the corpus folder that was featurized

    @classmethod
    def of_genres(
        cls, genres: Genres, n_parts: int, source: str, labels: str = "genres", subset: str = "large"
    ) -> StoreHeader:
        """Return the header of a store over FMA's genre vocabulary `genres` (genreclf.metadata.Genres)."""
        return cls(
            signal=SignalConfig(),
            genres=list(genres.names),
            genre_ids=[int(i) for i in genres.ids],
            genre_parents=[int(i) for i in genres.parents],
            genre_top_level=[int(i) for i in genres.top_level],
            labels=labels,
            subset=subset,
            n_parts=n_parts,
            source=source,
        )

    def to_json(self) -> str:
        """The header as store.json text."""
        d = dict(self.__dict__, signal=self.signal.to_dict(), format=STORE_FORMAT, version=STORE_VERSION)
        return json.dumps(d, indent=1)

    @classmethod
    def read(cls, store: Path) -> StoreHeader:
        """Read STORE/store.json, checking it is a genreclf store."""
        path = store / "store.json"
        if not path.exists():
            raise GenreclfError(f"{store}: not a feature store (no store.json); create one with `genreclf featurize`")
        try:
            d = json.loads(path.read_text())
        except ValueError as e:
            raise GenreclfError(f"{path}: unreadable ({e}); re-run `genreclf featurize`") from None
        if d.get("format") != STORE_FORMAT or d.get("version") != STORE_VERSION:
            raise GenreclfError(f"{store}: not a genreclf feature store of version {STORE_VERSION}; re-featurize")
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k != "signal"}
        return cls(signal=SignalConfig.from_dict(d["signal"]), **fields)


def _create_features(path: Path, shape: tuple[int, int, int]) -> None:
    """Create an all-zero float16 .npy of `shape` with its disk space reserved.

    Writing rows into a memory map of a sparse file on a full disk kills the process with
    SIGBUS; reserving the space here turns that into an OSError before any work is done.
    """
    features = np.lib.format.open_memmap(path, "w+", np.float16, shape)
    size = features.offset + features.nbytes
    del features
    if hasattr(os, "posix_fallocate"):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            path.unlink(missing_ok=True)
            raise GenreclfError(
                f"{path.parent}: cannot reserve {size / 1e9:.2f} GB for the features "
                f"({e.strerror}); free some disk space or use another --out"
            ) from None
        finally:
            os.close(fd)


class PartWriter:
    """Writes one part of a store, resuming where an earlier run stopped."""

    def __init__(self, part_dir: Path, plan: pd.DataFrame, targets: np.ndarray, n_frames: int, n_mels: int):
        self.dir = part_dir
        part_dir.mkdir(parents=True, exist_ok=True)
        plan = plan.reset_index(drop=True)
        plan.insert(0, "row", np.arange(len(plan)))
        plan_path = part_dir / "plan.csv"
        if plan_path.exists():
            old = pd.read_csv(plan_path)
            if not np.array_equal(old["track_id"].to_numpy(), plan["track_id"].to_numpy()):
                raise GenreclfError(
                    f"{part_dir} was started with other tracks (another subset, shard or corpus); "
                    "use a new --out folder or delete this one"
                )
        shape = (len(plan), n_frames, n_mels)
        if not (part_dir / "features.npy").exists() or not plan_path.exists():
            atomic_save_npy(part_dir / "targets.npy", targets.astype(np.uint8))
            atomic_save_npy(part_dir / "state.npy", np.zeros(len(plan), np.int32))
            _create_features(part_dir / ".features.npy.tmp", shape)
            os.replace(part_dir / ".features.npy.tmp", part_dir / "features.npy")
            atomic_write_text(plan_path, plan.to_csv(index=False))
        elif not np.array_equal(np.load(part_dir / "targets.npy"), targets.astype(np.uint8)):
            raise GenreclfError(
                f"{part_dir} was started with other labels (tracks.csv changed since); "
                "use a new --out folder or delete this one"
            )
        self.plan = plan
        self.features = np.load(part_dir / "features.npy", mmap_mode="r+")
        if self.features.shape != shape:
            raise GenreclfError(
                f"{part_dir}: features.npy has shape {self.features.shape}, expected {shape}; delete it"
            )
        self.state = np.load(part_dir / "state.npy", mmap_mode="r+")
        self._failed = open(part_dir / "failed.csv", "a", newline="", encoding="utf-8")  # noqa: SIM115 (closed by close/finish)
        if self._failed.tell() == 0:
            csv.writer(self._failed).writerow(["track_id", "path", "reason"])

    def pending_rows(self) -> np.ndarray:
        """Rows not yet done or failed."""
        return np.flatnonzero(self.state == PENDING)

    def retry_failed(self) -> int:
        """Mark the failed rows pending again (the part is no longer complete); return how many."""
        failed = np.flatnonzero(self.state == FAILED)
        if len(failed):
            self.state[failed] = PENDING
            self.state.flush()
            (self.dir / "part.json").unlink(missing_ok=True)
        return len(failed)

    def write(self, row: int, features: np.ndarray, n_valid: int) -> None:
        """Store the features of `row` and mark it done."""
        self.features[row] = features
        self.state[row] = n_valid

    def fail(self, row: int, reason: str) -> None:
        """Record that `row` could not be featurized and why."""
        rec = self.plan.iloc[row]
        csv.writer(self._failed).writerow([int(rec.track_id), rec.path, reason])
        self._failed.flush()
        self.state[row] = FAILED

    def flush(self) -> None:
        """Push written rows to disk, features before the state that marks them done."""
        self.features.flush()
        self.state.flush()

    def finish(self) -> dict:
        """Mark the part complete (part.json) once no row is pending; return its counts.

        failed.csv is rewritten to list only the tracks that are failed now, each with
        its latest reason (a retried track that worked is no longer listed).
        """
        self.flush()
        self._failed.close()
        failed = pd.read_csv(self.dir / "failed.csv", dtype={"path": str, "reason": str}, keep_default_na=False)
        ids = pd.to_numeric(failed["track_id"], errors="coerce")  # a stray header line must not empty it
        now = set(self.plan.track_id.to_numpy()[self.state[:] == FAILED].tolist())
        failed = failed[ids.isin(now)].assign(track_id=ids[ids.isin(now)].astype("int64"))
        failed = failed.drop_duplicates("track_id", keep="last")
        atomic_write_text(self.dir / "failed.csv", failed.to_csv(index=False))
        counts = {
            "tracks": len(self.plan),
            "done": int((self.state > 0).sum()),
            "failed": int((self.state < 0).sum()),
            "silent": int(failed["reason"].str.startswith("silent").sum()),
        }
        if counts["done"] + counts["failed"] == counts["tracks"]:
            atomic_write_text(self.dir / "part.json", json.dumps(counts))
        return counts

    def close(self) -> None:
        """Flush and release files without marking the part complete."""
        self.flush()
        self._failed.close()


class FeatureStore:
    """A complete store opened for reading: features are memory-mapped, labels in memory."""

    def __init__(self, path: Path, header: StoreHeader, index: pd.DataFrame, targets: np.ndarray, failed: pd.DataFrame):
        self.path = path
        self.header = header
        self.signal = header.signal
        self.genres = list(header.genres)
        self.genre_ids = np.asarray(header.genre_ids, dtype=np.int64)
        self.index = index  # one row per featurized track: track_id, part, row, valid_frames, split, ...
        self.track_ids = index["track_id"].to_numpy(np.int64)
        self.valid_frames = index["valid_frames"].to_numpy(np.int64)
        self.split = index["split"].to_numpy(str)
        self.artist_ids = index["artist_id"].to_numpy(np.int64)
        self.targets = targets  # uint8 (tracks, genres), aligned with track_ids
        self.parts = index["part"].to_numpy(np.int64)  # where each track's features are: part ...
        self.rows = index["row"].to_numpy(np.int64)  # ... and row in it
        self.failed = failed
        self._position = {int(t): i for i, t in enumerate(self.track_ids)}
        self._features: list[np.ndarray] | None = None
        self.in_memory = False  # True once read_into_memory() replaced the memory maps

    @classmethod
    def open(cls, path: str | Path) -> FeatureStore:
        """Open a complete store written by `genreclf featurize`."""
        path = Path(path)
        header = StoreHeader.read(path)
        parts, targets, failed = [], [], []
        for k in range(header.n_parts):
            part_dir = path / part_name(k, header.n_parts)
            if not (part_dir / "part.json").exists():
                raise GenreclfError(
                    f"{path}: part {k + 1} of {header.n_parts} is not finished; "
                    "run the same `genreclf featurize` command again to complete it"
                )
            plan = pd.read_csv(
                part_dir / "plan.csv", dtype={"path": str, "split": str, "genre_top": str}, keep_default_na=False
            )
            state = np.load(part_dir / "state.npy")
            done = state > 0
            plan = plan.assign(part=k, valid_frames=state)
            parts.append(plan[done])
            targets.append(np.load(part_dir / "targets.npy")[done])
            fails = pd.read_csv(part_dir / "failed.csv", dtype={"path": str, "reason": str}, keep_default_na=False)
            failed_ids = set(plan.loc[state == FAILED, "track_id"].tolist())
            failed.append(fails[fails["track_id"].isin(failed_ids)].drop_duplicates("track_id", keep="last"))
        index = pd.concat(parts, ignore_index=True)
        order = np.argsort(index["track_id"].to_numpy(), kind="stable")
        index = index.iloc[order].reset_index(drop=True)
        all_targets = np.concatenate(targets)[order] if targets else np.zeros((0, len(header.genres)), np.uint8)
        return cls(path, header, index, all_targets, pd.concat(failed, ignore_index=True))

    def __len__(self) -> int:
        return len(self.track_ids)

    def __getstate__(self) -> dict:
        # DataLoader workers get the labels and reopen the memory maps themselves (forked workers, Linux's
        # default, are not pickled: they share a store read into memory, copy-on-write).
        return dict(self.__dict__, _features=None, in_memory=False)

    def _maps(self) -> list[np.ndarray]:
        if self._features is None:
            self._features = [
                np.load(self.path / part_name(k, self.header.n_parts) / "features.npy", mmap_mode="r")
                for k in range(self.header.n_parts)
            ]
        return self._features

    @property
    def frame_shape(self) -> tuple[int, int]:
        """Return (frames, mels) of a track's features."""
        return tuple(self._maps()[0].shape[1:])

    @property
    def features_bytes(self) -> int:
        """Return the size of the features arrays of every part (failed rows included): what memory would hold."""
        return sum(m.nbytes for m in self._maps())

    def read_into_memory(self) -> None:
        """Replace the memory maps by in-memory copies of the features (features_bytes of process memory)."""
        if not self.in_memory:
            self._features = [np.array(m) for m in self._maps()]
            self.in_memory = True

    def gather(self, positions: np.ndarray, frames: np.ndarray) -> np.ndarray:
        """Return float16 (B, L, mels) features: row i holds frames[i] (B, L) of the track at positions[i].

        One fancy-indexed read per part the tracks are in, not one call per track.
        """
        maps, parts, rows = self._maps(), self.parts[positions], self.rows[positions]
        if len(maps) == 1:
            return maps[0][rows[:, None], frames]
        out = np.empty((*frames.shape, maps[0].shape[2]), np.float16)
        for k in np.unique(parts):
            mine = parts == k
            out[mine] = maps[k][rows[mine, None], frames[mine]]
        return out

    def item(self, i: int) -> np.ndarray:
        """Return the (frames, mels) float16 features of the i-th track (a memory-mapped view)."""
        return self._maps()[self.parts[i]][self.rows[i]]

    def position(self, track_id: int) -> int:
        """Return the position of `track_id` in track_ids."""
        try:
            return self._position[int(track_id)]
        except KeyError:
            raise GenreclfError(f"track {track_id} is not in the store {self.path}") from None

    def features(self, track_id: int) -> np.ndarray:
        """Return the (938, 128) float16 features of a track."""
        return self.item(self.position(track_id))

    def describe(self) -> str:
        """One line saying what the store holds."""
        h = self.header
        return (
            f"{len(self)} tracks ({len(self.failed)} failed) of FMA subset '{h.subset}' from {h.source}, "
            f"labels '{h.labels}', {len(self.genres)} genres"
        )
