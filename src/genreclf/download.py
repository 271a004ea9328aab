"""Fetch FMA's official archives: resumable download, SHA-1 check, resumable unzip.

For each archive NAME (fma_metadata.zip, fma_large.zip, ...) the target folder holds:

    NAME.part       the download in progress (resumed with an HTTP Range request)
    NAME            the complete archive, renamed from NAME.part once its SHA-1 matched
    NAME.verified   size, mtime and SHA-1 of NAME, so a re-run need not hash 93 GB again
    NAME.extracted  written once every member is unzipped (lets the archive be deleted)

Members are unzipped to a temporary name and renamed into place, and a member that is
already there with the right size is skipped, so a killed unzip continues where it stopped.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from genreclf import __version__
from genreclf.atomic import atomic_write_text
from genreclf.errors import GenreclfError

log = logging.getLogger(__name__)

# Where FMA's README (github.com/mdeff/fma, "Data" and "Usage") says the archives are.
FMA_URL = "https://os.unil.cloud.switch.ch/fma/"
# SHA-1 of each archive as published in FMA's README (github.com/mdeff/fma, "Usage" step
# "Download some data, verify its integrity", and "History: 2017-05-09 pre-publication release").
FMA_SHA1 = {
    "fma_metadata.zip": "f0df49ffe5f2a6008d7dc83c6915b31835dfe733",  # 342 MiB
    "fma_small.zip": "ade154f733639d52e35e32f5593efe5be76c6d70",  # 7.2 GiB, 8,000 clips
    "fma_medium.zip": "c67b69ea232021025fca9231fc1c7c1a063ab50b",  # 22 GiB, 25,000 clips
    "fma_large.zip": "497109f4dd721066b5ce5e5f250ec604dc78939e",  # 93 GiB, 106,574 clips
    "fma_full.zip": "0f0ace23fbe9ba30ecb7e95f763e435ea802b8ab",  # 879 GiB, untrimmed tracks
}
SUBSETS = ("metadata", "small", "medium", "large", "full")

CHUNK = 1 << 20  # bytes per read and write
TIMEOUT = 60.0  # seconds without data before a connection counts as dropped
MAX_STALLS = 5  # consecutive attempts that add no bytes before giving up
MAX_ATTEMPTS = 100  # attempts per archive in one run, whatever happens
EXTRACT_TASK_BYTES = 512 << 20  # unzip work handed to a worker at a time
USER_AGENT = f"genreclf/{__version__} (+urllib)"


def archives(subset: str) -> list[str]:
    """Return the archive names to fetch for `subset`: an audio subset comes with the metadata."""
    if subset not in SUBSETS:
        raise GenreclfError(f"unknown FMA subset {subset!r}; choose one of {', '.join(SUBSETS)}")
    return ["fma_metadata.zip"] + ([] if subset == "metadata" else [f"fma_{subset}.zip"])


def download(
    subset: str,
    to: str | Path,
    base_url: str = FMA_URL,
    checksums: dict[str, str] | None = None,
    keep_archives: bool = True,
    workers: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """Fetch, verify and unzip FMA's `subset` (plus the metadata) into `to`; return the unzipped folders.

    Every step resumes: a partial download continues, a verified archive is not fetched
    again, and members already unzipped are skipped. `checksums` maps archive names to
    SHA-1s (default: FMA's published ones). With `keep_archives=False` each archive is
    deleted once it is fully unzipped. `workers` processes unzip in parallel (default: all cores).
    """
    to = Path(to)
    names = archives(subset)
    checksums = FMA_SHA1 if checksums is None else checksums
    missing = [n for n in names if n not in checksums]
    if missing:
        raise GenreclfError(f"no SHA-1 known for {', '.join(missing)}; pass checksums for these archives")
    to.mkdir(parents=True, exist_ok=True)
    folders: list[Path] = []
    for name in names:
        archive, sha1 = to / name, checksums[name].lower()
        done = _read_marker(_marker(archive, "extracted"))
        if not archive.exists() and done.get("sha1") == sha1:
            log.info("%s: already unzipped into %s (archive deleted); skipping", name, to)
            folders += [to / f for f in done.get("folders", [])]
            continue
        fetch(base_url.rstrip("/") + "/" + name, archive, sha1, progress=progress)
        extracted = extract(archive, to, workers=workers, progress=progress)
        _write_marker(_marker(archive, "extracted"), {"sha1": sha1, "folders": [p.name for p in extracted]})
        if not keep_archives:
            archive.unlink()
            _marker(archive, "verified").unlink(missing_ok=True)
            log.info("%s: unzipped, archive deleted", name)
        folders += extracted
    return folders


# ---------------------------------------------------------------------------- download


def fetch(url: str, dest: str | Path, sha1: str, progress: bool = True) -> Path:
    """Return `dest` holding the file at `url` with SHA-1 `sha1`, downloading or resuming only if needed."""
    dest = Path(dest)
    sha1 = sha1.lower()
    if dest.exists():
        if not _verified(dest, sha1, progress):
            raise GenreclfError(
                f"{dest} exists but its SHA-1 is not {sha1}; delete it (and {dest.name}.verified) "
                "and run again to download it anew"
            )
        log.info("%s: already downloaded and verified", dest.name)
        return dest
    part = dest.with_name(dest.name + ".part")
    digest = _download(url, part, progress)
    if digest != sha1:
        raise GenreclfError(
            f"{part}: SHA-1 {digest} is not the published {sha1}, the download is corrupt; delete {part} and run again"
        )
    os.replace(part, dest)
    _remember_verified(dest, sha1)
    return dest


def _download(url: str, part: Path, progress: bool) -> str:
    """Download `url` into `part`, resuming from its current size; return the file's SHA-1."""
    opener = urllib.request.build_opener()  # reads the proxy settings of the environment now
    digest, hashed = hashlib.sha1(), 0
    stalls = 0
    for _ in range(MAX_ATTEMPTS):
        have = part.stat().st_size if part.exists() else 0
        try:
            resp, start, total = _open(opener, url, have)
            if resp is None:  # the server says `part` already holds the whole file
                break
            with resp:
                if hashed != start:  # a new process, or the server restarted us at 0
                    digest, hashed = _sha1_prefix(part, start, progress), start
                _check_space(part.parent, total - start if total is not None else 0, part.name)
                hashed, error = _receive(resp, part, start, total, digest, progress)
            if error is None and (total is None or hashed >= total):
                break
            reason = error or f"connection closed after {hashed - start:,} of {total - start:,} bytes"
        except GenreclfError:
            raise
        except urllib.error.HTTPError as e:
            if e.code not in (408, 429) and e.code < 500:
                raise GenreclfError(f"{url}: HTTP {e.code} {e.reason}; check the URL (--base-url)") from None
            reason = f"HTTP {e.code} {e.reason}"
        except (OSError, http.client.HTTPException) as e:  # URLError, reset, timeout, truncated read
            reason = f"{type(e).__name__}: {e}"
        grew = part.exists() and part.stat().st_size > have
        stalls = 0 if grew else stalls + 1
        if stalls >= MAX_STALLS:
            raise GenreclfError(f"cannot download {url} ({reason}); check the network and run again to resume")
        log.warning("%s: %s; resuming", part.name, reason)
        time.sleep(0 if grew else min(2.0**stalls, 30.0))
    else:
        raise GenreclfError(f"gave up on {url} after {MAX_ATTEMPTS} attempts; run again to resume")
    size = part.stat().st_size
    if hashed != size:
        digest = _sha1_prefix(part, size, progress)
    return digest.hexdigest()


def _open(
    opener: urllib.request.OpenerDirector, url: str, have: int
) -> tuple[http.client.HTTPResponse | None, int, int | None]:
    """Return (response, first byte it holds, file size or None); response None if `have` is the whole file."""
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = opener.open(urllib.request.Request(url, headers=headers), timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:
            raise
        total = _content_range(e.headers.get("Content-Range", ""))[2]
        e.close()
        if total == have:
            return None, have, have
        log.warning("%s: the partial download is longer than the file on the server; restarting", url)
        return _open(opener, url, 0)
    if have and resp.status == 206:
        start, _, total = _content_range(resp.headers.get("Content-Range", ""))
        if start == have:
            return resp, start, total
        resp.close()
        log.warning("%s: the server sent another range than asked for; restarting", url)
        return _open(opener, url, 0)
    if have:
        log.warning("%s: the server does not resume downloads (no HTTP Range support); restarting", url)
    length = resp.headers.get("Content-Length")
    return resp, 0, int(length) if length and length.isdigit() else None


def _content_range(value: str) -> tuple[int | None, int | None, int | None]:
    """Return (first, last, size) of a Content-Range header such as `bytes 100-199/200` or `bytes */200`."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", value)
    if not m:
        return None, None, None
    return tuple(int(g) if g and g != "*" else None for g in m.groups())  # type: ignore[return-value]


def _receive(resp, part: Path, start: int, total: int | None, digest, progress: bool) -> tuple[int, str | None]:
    """Write the body of `resp` into `part` from byte `start` on, hashing it; return (bytes in part, error)."""
    pos, error = start, None
    with (
        open(part, "r+b" if part.exists() else "wb") as f,
        tqdm(
            total=total,
            initial=start,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=part.name.removesuffix(".part"),
            disable=not progress,
            dynamic_ncols=True,
        ) as bar,
    ):
        f.seek(start)
        f.truncate()  # drop whatever lies past `start` (a restart, or a longer stale part)
        try:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                digest.update(chunk)
                pos += len(chunk)
                bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as e:  # reset, timeout: keep what arrived
            error = f"{type(e).__name__}: {e}"
        f.flush()
        os.fsync(f.fileno())
    return pos, error


def _check_space(folder: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise GenreclfError(
            f"{folder} has {_gib(free)} free but {what} needs {_gib(needed)} more; "
            "free some space or use another folder"
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _sha1_prefix(path: Path, n: int, progress: bool):
    """Return a SHA-1 object fed with the first `n` bytes of `path`."""
    digest = hashlib.sha1()
    if n == 0:
        return digest
    with (
        open(path, "rb") as f,
        tqdm(
            total=n,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"checking {path.name}",
            disable=not progress,
            dynamic_ncols=True,
        ) as bar,
    ):
        left = n
        while left and (block := f.read(min(CHUNK * 8, left))):
            digest.update(block)
            left -= len(block)
            bar.update(len(block))
    return digest


def _verified(path: Path, sha1: str, progress: bool) -> bool:
    """Return whether `path` has SHA-1 `sha1`, trusting its .verified marker if size and mtime still match."""
    st = path.stat()
    seen = _read_marker(_marker(path, "verified"))
    if seen == {"sha1": sha1, "size": st.st_size, "mtime_ns": st.st_mtime_ns}:
        return True
    if _sha1_prefix(path, st.st_size, progress).hexdigest() != sha1:
        return False
    _remember_verified(path, sha1)
    return True


def _remember_verified(path: Path, sha1: str) -> None:
    st = path.stat()
    _write_marker(_marker(path, "verified"), {"sha1": sha1, "size": st.st_size, "mtime_ns": st.st_mtime_ns})


def _marker(archive: Path, kind: str) -> Path:
    return archive.with_name(f"{archive.name}.{kind}")


def _read_marker(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_marker(path: Path, content: dict) -> None:
    atomic_write_text(path, json.dumps(content) + "\n")


# ---------------------------------------------------------------------------- unzip


def extract(archive: str | Path, to: str | Path, workers: int | None = None, progress: bool = True) -> list[Path]:
    """Unzip `archive` into `to`, skipping members already there with the right size; return its top-level entries."""
    archive, to = Path(archive), Path(to)
    to.mkdir(parents=True, exist_ok=True)
    root = to.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise GenreclfError(f"{archive}: cannot read the zip ({e}); delete it and run again to re-download") from None
    todo: list[tuple[str, int]] = []
    done_bytes = 0
    for info in infos:
        target = root / info.filename
        if not target.resolve().is_relative_to(root):
            raise GenreclfError(f"{archive}: member {info.filename!r} points outside {to}; not an FMA archive")
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif target.is_file() and target.stat().st_size == info.file_size:
            done_bytes += info.file_size
        else:
            todo.append((info.filename, info.file_size))
    total = done_bytes + sum(size for _, size in todo)
    _check_space(root, sum(size for _, size in todo), f"unzipping {archive.name}")
    tasks = _split(todo, workers or os.cpu_count() or 1)
    n_workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    tops = sorted({to / Path(i.filename).parts[0] for i in infos if Path(i.filename).parts})
    if not todo:
        log.info("%s: all %d members already unzipped in %s", archive.name, len(infos), to)
        return tops
    log.info("%s: unzipping %d of %d members into %s", archive.name, len(todo), len(infos), to)
    with tqdm(
        total=total,
        initial=done_bytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"unzipping {archive.name}",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        if n_workers == 1:
            for task in tasks:
                bar.update(_extract_members((archive, root, task)))
        else:
            with mp.get_context("spawn").Pool(n_workers) as pool:
                for n in pool.imap_unordered(_extract_members, [(archive, root, t) for t in tasks]):
                    bar.update(n)
    return tops


def _split(todo: list[tuple[str, int]], workers: int) -> list[list[str]]:
    """Return `todo` cut into tasks of at most EXTRACT_TASK_BYTES, at least 4 per worker when there is work."""
    if not todo:
        return []
    budget = min(EXTRACT_TASK_BYTES, max(1, sum(s for _, s in todo) // (4 * workers)))
    tasks, current, size = [], [], 0
    for name, n in todo:
        current.append(name)
        size += n
        if size >= budget:
            tasks.append(current)
            current, size = [], 0
    return tasks + ([current] if current else [])


def _extract_members(task: tuple[Path, Path, list[str]]) -> int:
    """Unzip the named members of an archive under root, each via a temporary name; return bytes written."""
    archive, root, names = task
    written = 0
    with zipfile.ZipFile(archive) as zf:
        for name in names:
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.unzipping")
            try:
                with zf.open(name) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
            except (zipfile.BadZipFile, NotImplementedError, EOFError) as e:
                tmp.unlink(missing_ok=True)
                raise GenreclfError(
                    f"{archive}: cannot unzip {name} ({e}); delete the archive and run again, or unzip it with 7-Zip"
                ) from None
            os.replace(tmp, target)
            written += zf.getinfo(name).file_size
    return written
