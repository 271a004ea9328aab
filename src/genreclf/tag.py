"""Genre tags in the audio files themselves: read, plan, write atomically, and undo.

MP3 gets ID3v2.4 TCON with one value per genre; FLAC, Ogg Vorbis and Opus get Vorbis-comment
GENRE fields, one per genre. MP4/M4A gets one `©gen` value with the genres joined by a separator:
MP4 can hold several `©gen` values (mutagen writes them) but FFmpeg, iTunes and most players read
only the first, so the others would be invisible. Only the tag bytes change: the audio frames are
copied as they are, and each file is rewritten through a temporary copy renamed over it, so a
crash at any moment leaves either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from genreclf.errors import GenreclfError

MODES = ("fill", "replace", "append")  # fill: only untagged files; replace: overwrite; append: add missing
SEPARATOR = "; "  # joins genres where a format keeps one value (MP4); splits them when read back
FORMATS = {"MP3": "mp3", "FLAC": "flac", "OggVorbis": "ogg", "OggOpus": "opus", "MP4": "mp4"}  # mutagen -> ours
_MP4_GENRE = "\xa9gen"
_TMP_MARK = ".genreclf-tag."  # temporary copies are named .NAME.genreclf-tag.PID.tmp beside the file


@dataclass(frozen=True)
class TagPlan:
    """What tagging one file would do."""

    path: Path  # the file (symbolic links resolved: the target is tagged)
    format: str  # mp3, flac, ogg, opus or mp4
    old: list[str]  # the genres the file has now
    new: list[str]  # the genres it would have
    changed: bool  # whether new differs from old (nothing is written otherwise)


def _open(path: Path):
    """Return the mutagen file object of `path` and our format name, or raise GenreclfError."""
    import mutagen

    if not path.exists():
        raise GenreclfError(f"{path}: no such file; check the path")
    if not path.is_file():
        raise GenreclfError(f"{path}: not a file")
    try:
        f = mutagen.File(path)
    except PermissionError as e:
        raise GenreclfError(f"{path}: cannot be opened ({e.strerror}); check its permissions") from None
    except (mutagen.MutagenError, OSError, ValueError, EOFError) as e:  # mutagen's corrupt-file errors vary
        raise GenreclfError(f"{path}: cannot read its tags ({e}); the file is corrupt or not audio") from None
    if f is None:
        raise GenreclfError(f"{path}: not a recognised audio file; the file is corrupt or not audio")
    kind = type(f).__name__
    if kind not in FORMATS:
        raise GenreclfError(
            f"{path}: {kind} files have no genre tag genreclf can write; supported: MP3, FLAC, Ogg Vorbis, Opus, M4A"
        )
    return f, FORMATS[kind]


def _get(f, fmt: str, separator: str) -> list[str]:
    """Return the genre values of an open mutagen file."""
    if f.tags is None:
        return []
    if fmt == "mp3":
        return [t for frame in f.tags.getall("TCON") for t in frame.text if t]
    if fmt == "mp4":
        return [
            g.strip() for v in f.tags.get(_MP4_GENRE, []) for g in v.split(separator.strip() or separator) if g.strip()
        ]
    return [v for v in f.tags.get("genre", []) if v]


def _set(f, fmt: str, genres: list[str], separator: str) -> None:
    """Set (or, for no genres, remove) the genre tag of an open mutagen file."""
    if f.tags is None:
        f.add_tags()
    if fmt == "mp3":
        from mutagen.id3 import TCON

        f.tags.delall("TCON")
        if genres:
            f.tags.add(TCON(encoding=3, text=list(genres)))  # UTF-8; several values (ID3v2.4 null-separated)
    elif fmt == "mp4":
        if _MP4_GENRE in f.tags:
            del f.tags[_MP4_GENRE]
        if genres:
            f.tags[_MP4_GENRE] = [separator.join(genres)]
    else:
        if "genre" in f.tags:  # Vorbis comments: field names are case-insensitive (GENRE, Genre, ...)
            del f.tags["genre"]
        if genres:
            f.tags["genre"] = list(genres)


def read_genres(path: str | Path, separator: str = SEPARATOR) -> list[str]:
    """Return the genres in the tags of the file at `path` (an empty list when it has none)."""
    f, fmt = _open(Path(path))
    return _get(f, fmt, separator)


def merge(old: list[str], genres: list[str], mode: str) -> list[str]:
    """Return the genres a file with `old` genres gets in `mode`; no `genres` at all leaves `old` as it is."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if not genres or (mode == "fill" and old):
        return list(old)
    if mode == "replace":
        return list(dict.fromkeys(genres))
    have = {g.casefold() for g in old} if mode == "append" else set()
    new = list(old) if mode == "append" else []
    for g in genres:
        if g.casefold() not in have:
            new.append(g)
            have.add(g.casefold())
    return new


def plan(path: str | Path, genres: list[str], mode: str = "fill", separator: str = SEPARATOR) -> TagPlan:
    """Return what tagging `path` with `genres` in `mode` would do; nothing is written."""
    path = Path(path).resolve()
    f, fmt = _open(path)
    old = _get(f, fmt, separator)
    new = merge(old, genres, mode)
    return TagPlan(path, fmt, old, new, new != old)


def apply(change: TagPlan, separator: str = SEPARATOR, undo_log: UndoLog | None = None) -> None:
    """Write `change.new` as the genres of `change.path` (recorded first in `undo_log`), if it changes anything."""
    if not change.changed:
        return
    if undo_log is not None:
        undo_log.record(change)
    write_genres(change.path, change.new, separator)


def write_genres(path: str | Path, genres: list[str], separator: str = SEPARATOR) -> None:
    """Set the genres of the file at `path` (none: remove its genre tag), replacing the file atomically.

    The file is copied beside itself, tagged, fsynced, given the original's mode bits, times and (where
    allowed) owner, and renamed over the original; on any failure the copy is removed.
    """
    path = Path(path).resolve()
    if not path.is_file():
        _open(path)  # its clear error
    st = path.stat()  # before anything reads the file: reading updates the access time
    _open(path)  # a clear error before anything is copied
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}.tmp")
    try:
        shutil.copyfile(path, tmp)
        f, fmt = _open(tmp)
        _set(f, fmt, genres, separator)
        if fmt == "mp3":
            f.save(v2_version=4)  # an existing ID3v1 tag is kept and updated (mutagen's v1=1)
        else:
            f.save()
        with contextlib.suppress(PermissionError, AttributeError):  # not ours to give, or no chown (Windows)
            os.chown(tmp, st.st_uid, st.st_gid)
        shutil.copymode(path, tmp)
        with open(tmp, "rb+") as fd:
            os.fsync(fd.fileno())
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))  # last: the fsync and chmod leave the times alone
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- undo -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class UndoRecord:
    """One line of an undo log: a file's genres before and after a change."""

    path: str  # absolute path of the file
    format: str  # mp3, flac, ogg, opus or mp4
    old: list[str]  # its genres before ([] for none)
    new: list[str]  # its genres after
    time: str  # when the change was made, ISO 8601 with the UTC offset


class UndoLog:
    """An append-only JSON Lines file of the changes about to be made: `with UndoLog(path) as log: ...`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file: IO[str] | None = None

    def __enter__(self) -> UndoLog:
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by __exit__)
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def record(self, change: TagPlan) -> None:
        """Append `change` and make it durable before the file is touched."""
        if self._file is None:
            raise RuntimeError("UndoLog.record outside `with UndoLog(...)`")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        rec = UndoRecord(str(change.path), change.format, change.old, change.new, stamp)
        self._file.write(json.dumps(asdict(rec), ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())


def read_undo_log(path: str | Path) -> list[UndoRecord]:
    """Return the records of an undo log in the order they were written."""
    path = Path(path)
    if not path.is_file():
        raise GenreclfError(f"{path}: no such undo log; give the file written by `genreclf tag --undo-log`")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                records.append(UndoRecord(d["path"], d["format"], list(d["old"]), list(d["new"]), d["time"]))
            except (ValueError, KeyError, TypeError):
                if n == _count_lines(path):  # a last line cut short by a kill: its change never happened
                    break
                raise GenreclfError(f"{path}:{n}: not an undo log record; give a log of `genreclf tag`") from None
    return records


def _count_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


@dataclass(frozen=True)
class UndoResult:
    """What undoing one file did."""

    path: str
    status: str  # "restored", "unchanged" (already has its old genres), "changed since" (skipped), "error"
    genres: list[str]  # the genres it has now
    message: str = ""  # for an error: what went wrong


def undo(path: str | Path, separator: str = SEPARATOR) -> Iterator[UndoResult]:
    """Restore the genres recorded in the undo log at `path`; yield what each file got, in the log's order.

    Each file's changes are undone newest first while the file still has the genres a change gave it
    (a change that was logged but never written, as when a run was killed, is passed over). Where a file's
    genres were changed since by something else (by hand, another tool), the undoing stops there: that
    later edit is never lost, and the file is reported as "changed since".
    """
    changes: dict[str, list[UndoRecord]] = {}
    for rec in read_undo_log(path):
        changes.setdefault(rec.path, []).append(rec)
    for file, recs in changes.items():
        try:
            now = read_genres(file, separator)
            target, intact = now, True
            for rec in reversed(recs if now != recs[0].old else []):  # at its first genres: restored already
                if target == rec.new:
                    target = rec.old
                elif target != rec.old:
                    intact = False
                    break
            if target != now:
                write_genres(file, target, separator)
            status = "changed since" if not intact else "restored" if target != now else "unchanged"
            yield UndoResult(file, status, target)
        except (GenreclfError, OSError) as e:
            yield UndoResult(file, "error", [], str(e))
