"""download.py against a real HTTP server on 127.0.0.1 serving small FMA-shaped zips."""

from __future__ import annotations

import hashlib
import http.server
import io
import random
import re
import socket
import threading
import zipfile
from pathlib import Path

import pytest

from genreclf.download import archives, download, extract, fetch
from genreclf.errors import GenreclfError


def make_zip(members: dict[str, bytes]) -> bytes:
    """Return a zip of `members`, bzip2-compressed like FMA's archives."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_BZIP2) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


rng = random.Random(0)
METADATA = {
    "fma_metadata/tracks.csv": b",album,album\n,comments,date_created\ntrack_id,,\n2,0,2008-11-26 01:44:45\n",
    "fma_metadata/genres.csv": b"genre_id,#tracks,parent,title,top_level\n1,8693,38,Avant-Garde,38\n",
}
AUDIO = {f"fma_small/{i // 3:03d}/{i:06d}.mp3": rng.randbytes(40_000 + 1000 * i) for i in range(2, 8)}
FILES = {"fma_metadata.zip": make_zip(METADATA), "fma_small.zip": make_zip(AUDIO)}
CHECKSUMS = {name: sha1(data) for name, data in FILES.items()}


class Server(http.server.ThreadingHTTPServer):
    """Serves FILES under /fma/, with HTTP Range support, a log of requests and injectable faults."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[tuple[str, str | None]] = []  # (file name, Range header)
        self.drop_after: dict[str, int] = {}  # file -> close the next response after this many bytes
        self.ignore_range = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/fma/"


class Handler(http.server.BaseHTTPRequestHandler):
    server: Server

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        name = self.path.rsplit("/", 1)[-1]
        wanted = self.headers.get("Range")
        self.server.requests.append((name, wanted))
        data = FILES.get(name)
        if data is None:
            self.send_error(404)
            return
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", wanted or "")
        if m and not self.server.ignore_range:
            start = int(m[1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = self.server.drop_after.pop(name, None)
        if cut is None:
            self.wfile.write(body)
            return
        self.wfile.write(body[:cut])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)  # the client sees the body end early


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def small(server: Server, to: Path, **kwargs) -> list[Path]:
    return download("small", to, base_url=server.url, checksums=CHECKSUMS, progress=False, workers=1, **kwargs)


def assert_unzipped(to: Path) -> None:
    for name, data in {**METADATA, **AUDIO}.items():
        assert (to / name).read_bytes() == data, name


def test_subset_names_and_published_checksums():
    assert archives("metadata") == ["fma_metadata.zip"]
    assert archives("large") == ["fma_metadata.zip", "fma_large.zip"]  # featurize needs tracks.csv
    with pytest.raises(GenreclfError, match="choose one of"):
        archives("huge")
    from genreclf.download import FMA_SHA1

    assert FMA_SHA1["fma_large.zip"] == "497109f4dd721066b5ce5e5f250ec604dc78939e"
    assert all(re.fullmatch(r"[0-9a-f]{40}", v) for v in FMA_SHA1.values()) and len(FMA_SHA1) == 5


def test_download_verifies_and_unzips(server, tmp_path):
    folders = small(server, tmp_path)
    assert folders == [tmp_path / "fma_metadata", tmp_path / "fma_small"]
    assert_unzipped(tmp_path)
    assert [name for name, _ in server.requests] == ["fma_metadata.zip", "fma_small.zip"]
    assert (tmp_path / "fma_small.zip").read_bytes() == FILES["fma_small.zip"]
    assert not list(tmp_path.glob("*.part")) and not list(tmp_path.rglob(".*.unzipping"))


def test_dropped_connection_resumes_with_range(server, tmp_path):
    server.drop_after["fma_small.zip"] = 50_000
    small(server, tmp_path)
    assert server.requests[1:] == [("fma_small.zip", None), ("fma_small.zip", "bytes=50000-")]
    assert_unzipped(tmp_path)


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_killed_run_resumes_from_part(server, tmp_path, fraction):
    data = FILES["fma_small.zip"]
    cut = int(len(data) * fraction)  # 1.0: killed after the last byte, before the rename
    (tmp_path / "fma_small.zip.part").write_bytes(data[:cut])
    small(server, tmp_path)
    assert server.requests[1:] == [("fma_small.zip", f"bytes={cut}-")]
    assert (tmp_path / "fma_small.zip").read_bytes() == data
    assert_unzipped(tmp_path)


@pytest.mark.parametrize("case", ["server ignores Range", "part longer than the file"])
def test_unusable_part_restarts_cleanly(server, tmp_path, case):
    data = FILES["fma_small.zip"]
    junk = b"x" * 1000 if case == "server ignores Range" else data + b"trailing junk"
    server.ignore_range = case == "server ignores Range"
    (tmp_path / "fma_small.zip.part").write_bytes(junk)
    small(server, tmp_path)
    assert (tmp_path / "fma_small.zip").read_bytes() == data
    assert_unzipped(tmp_path)


def test_wrong_checksum_is_an_error_that_removes_nothing(server, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "fma_metadata").mkdir()
    (tmp_path / "fma_metadata" / "tracks.csv").write_text("old copy")
    before = sorted(tmp_path.rglob("*"))
    bad = {**CHECKSUMS, "fma_metadata.zip": "0" * 40}
    with pytest.raises(GenreclfError, match=r"delete .*fma_metadata\.zip\.part and run again"):
        download("small", tmp_path, base_url=server.url, checksums=bad, progress=False)
    assert sorted(tmp_path.rglob("*")) == sorted(before + [tmp_path / "fma_metadata.zip.part"])
    assert (tmp_path / "fma_metadata.zip.part").read_bytes() == FILES["fma_metadata.zip"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "fma_metadata" / "tracks.csv").read_text() == "old copy"


def test_existing_corrupt_archive_is_an_error_and_kept(server, tmp_path):
    (tmp_path / "fma_metadata.zip").write_bytes(b"not the archive")
    with pytest.raises(GenreclfError, match="delete it"):
        download("metadata", tmp_path, base_url=server.url, checksums=CHECKSUMS, progress=False)
    assert (tmp_path / "fma_metadata.zip").read_bytes() == b"not the archive"
    assert server.requests == []


def test_verified_archives_are_not_fetched_again(server, tmp_path):
    for name, data in FILES.items():
        (tmp_path / name).write_bytes(data)
    small(server, tmp_path)
    assert server.requests == []
    assert_unzipped(tmp_path)
    member = tmp_path / "fma_small/000/000002.mp3"
    stamp = member.stat().st_ino, member.stat().st_mtime_ns
    assert (tmp_path / "fma_small.zip.verified").exists()
    small(server, tmp_path)  # trusts the .verified marker, skips unzipped members
    assert server.requests == []
    assert (member.stat().st_ino, member.stat().st_mtime_ns) == stamp


def test_deleted_archives_are_not_fetched_again(server, tmp_path):
    assert small(server, tmp_path, keep_archives=False) == [tmp_path / "fma_metadata", tmp_path / "fma_small"]
    assert not list(tmp_path.glob("*.zip"))
    assert_unzipped(tmp_path)
    assert small(server, tmp_path, keep_archives=False) == [tmp_path / "fma_metadata", tmp_path / "fma_small"]
    assert len(server.requests) == 2


def test_http_error_is_a_user_error(server, tmp_path):
    with pytest.raises(GenreclfError, match="HTTP 404"):
        fetch(server.url + "fma_nothing.zip", tmp_path / "fma_nothing.zip", "0" * 40, progress=False)
    assert server.requests == [("fma_nothing.zip", None)]


@pytest.mark.parametrize("workers", [1, 2])
def test_unzip_resumes_and_repairs(tmp_path, workers):
    archive = tmp_path / "fma_small.zip"
    archive.write_bytes(FILES["fma_small.zip"])
    out = tmp_path / "data"
    assert extract(archive, out, workers=workers, progress=False) == [out / "fma_small"]
    names = sorted(AUDIO)
    kept, cut, gone = (out / n for n in names[:3])
    stamp = kept.stat().st_ino, kept.stat().st_mtime_ns
    cut.write_bytes(cut.read_bytes()[:100])  # as if a copy was made without our temp-file rename
    gone.unlink()
    (gone.parent / f".{gone.name}.unzipping").write_bytes(b"stale")  # left by a killed run
    extract(archive, out, workers=workers, progress=False)
    for name, data in AUDIO.items():
        assert (out / name).read_bytes() == data
    assert (kept.stat().st_ino, kept.stat().st_mtime_ns) == stamp
    assert not list(out.rglob(".*.unzipping"))  # the stale temp file was overwritten, then renamed


def test_unzip_refuses_paths_outside_the_folder(tmp_path):
    archive = tmp_path / "evil.zip"
    archive.write_bytes(make_zip({"../escaped.txt": b"gotcha"}))
    with pytest.raises(GenreclfError, match="outside"):
        extract(archive, tmp_path / "out", progress=False)
    assert not (tmp_path / "escaped.txt").exists()
