"""`genreclf serve`: the API on real uploads (good, broken, oversize), keys, crashing and hanging decoders,
then a real uvicorn under concurrent load, and the page in headless Chromium."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import write_bad_files, write_mp3

from genreclf.cli import main
from genreclf.modelfile import ModelFile
from genreclf.models import TransformerConfig, model_from_config
from genreclf.predict import Tagger
from genreclf.windows import decode_file

fastapi = pytest.importorskip("fastapi", reason='the serve extra is not installed: pip install "genreclf[serve]"')
with warnings.catch_warnings():  # Starlette >= 1.10 would rather have httpx2; httpx still works
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient` is deprecated")
    from fastapi.testclient import TestClient

from genreclf.serve import ServeConfig, create_app  # noqa: E402

GENRES = ["Rock", "Jazz", "Folk", "Pop", "Electronic"]


def _model(path: Path, thresholds: dict | None) -> Path:
    torch.manual_seed(0)
    config = TransformerConfig(n_genres=5, n_layers=1, n_heads=2, d_ff=32, head_factor=1)  # fast on a CPU
    mf = ModelFile(model_from_config(config).eval(), config, GENRES, list(range(1, 6)), thresholds=thresholds)
    mf.provenance = {"store": "synthetic", "epochs": 0}
    return mf.save(path)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """A small untrained tagger with per-genre thresholds: its outputs depend on the audio, all these tests need."""
    return _model(tmp_path_factory.mktemp("model") / "model.safetensors", {"values": [0.5, 0.6, 0.7, 0.5, 0.4]})


@pytest.fixture(scope="module")
def bare_model_path(tmp_path_factory) -> Path:
    """The same without thresholds (a model from before calibration)."""
    return _model(tmp_path_factory.mktemp("bare") / "model.safetensors", None)


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory) -> dict[str, Path]:
    """Good uploads of 25 s in four formats, and broken ones of each kind."""
    folder = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(3)
    t = np.arange(25 * 22050) / 22050
    wave = (0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
    files = {"mp3": write_mp3(folder / "tone.mp3", seconds=25.0)}
    for kind, fmt, subtype in [("wav", "WAV", "PCM_16"), ("flac", "FLAC", "PCM_16"), ("ogg", "OGG", "VORBIS")]:
        sf.write(folder / f"tone.{kind}", wave, 22050, format=fmt, subtype=subtype)
        files[kind] = folder / f"tone.{kind}"
    files.update(write_bad_files(folder / "bad"))
    sf.write(folder / "short.wav", wave[:5000], 22050)  # 0.23 s: under audio.MIN_SECONDS
    files["short"] = folder / "short.wav"
    sf.write(folder / "silence.wav", np.zeros(22050 * 5, np.float32), 22050)
    files["silent"] = folder / "silence.wav"
    return files


@pytest.fixture(scope="module")
def uploads_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("uploads")


@pytest.fixture(scope="module")
def client(model_path, uploads_root):
    app = create_app(model_path, ServeConfig(workers=2, max_upload_mb=2.0), upload_root=uploads_root)
    with TestClient(app) as c:
        yield c
    assert not list(uploads_root.iterdir()), "every upload's temporary folder is removed"


def _post(client, path: Path, name: str | None = None, **kwargs):
    return client.post("/v1/predict", files={"file": (name or path.name, path.read_bytes())}, **kwargs)


def _one_line_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error and "\n" not in error and "genreclf-serve-" not in error  # no server paths
    return error


@pytest.mark.parametrize("kind", ["mp3", "wav", "flac", "ogg"])
def test_an_upload_gets_the_genres_tagger_predict_gives_its_file(client, model_path, audio_files, kind):
    path = audio_files[kind]
    response = _post(client, path)
    assert response.status_code == 200, response.text
    r = response.json()
    expected = Tagger.load(model_path, device="cpu").predict(path, timeline=10)
    assert r["file"] == path.name and r["duration"] == pytest.approx(25.0, abs=0.1)
    probabilities = [r["probabilities"][g] for g in GENRES]
    np.testing.assert_allclose(probabilities, expected.probabilities, atol=1e-4)
    assert [g["genre"] for g in r["genres"]] == [g for g, _ in expected.top(5)]
    assert r["chosen"] == expected.chosen() and "warning" not in r
    segments = r["timeline"]["segments"]
    assert r["timeline"]["step"] == 10 and [(s["start"], s["end"]) for s in segments] == [(0, 10), (10, 20), (20, 25)]
    for segment, row in zip(segments, expected.timeline.probabilities):
        assert segment["genres"][0]["probability"] == pytest.approx(row.max(), abs=1e-4)


def test_silent_audio_gets_a_warning_and_no_genres(client, audio_files):
    r = _post(client, audio_files["silent"]).json()
    assert r["genres"] == [] and r["chosen"] == [] and "silent audio" in r["warning"]
    assert all(p is None for p in r["probabilities"].values())


@pytest.mark.parametrize(
    "kind, status, words",
    [
        ("empty", 400, "empty upload"),
        ("random", 415, "not a readable audio file"),
        ("truncated", 415, "not a readable audio file"),
        ("text", 415, "not a readable audio file"),
        ("short", 422, "too short"),
    ],
)
def test_a_broken_upload_gets_a_one_line_4xx(client, audio_files, kind, status, words):
    error = _one_line_error(_post(client, audio_files[kind], name=f"../../etc/{kind}.mp3"), status)
    assert words in error and error.startswith(f"{kind}.mp3:")  # the client's name, never a path of ours


def test_an_oversize_upload_gets_413_whether_or_not_it_says_its_length(client):
    big = os.urandom(3_000_000)  # the cap is 2 MB
    assert _one_line_error(client.post("/v1/predict", files={"file": ("big.mp3", big)}), 413).endswith("limit")
    boundary = "x" * 16
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.mp3"\r\n\r\n').encode()

    def chunked():  # no Content-Length: the bytes are counted as they are written
        yield body
        for _ in range(30):
            yield b"\0" * 100_000

    response = client.post(
        "/v1/predict", content=chunked(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    _one_line_error(response, 413)


def test_a_request_without_the_file_field_gets_422(client, audio_files):
    data = audio_files["mp3"].read_bytes()
    assert "field 'file'" in _one_line_error(client.post("/v1/predict", files={"audio": ("a.mp3", data)}), 422)
    assert "multipart" in _one_line_error(client.post("/v1/predict", content=data), 422)


def test_model_genres_health_docs_and_page(client):
    model = client.get("/v1/model").json()
    assert model["architecture"] == "transformer" and model["has_thresholds"] is True
    assert model["parameters"] > 0 and model["provenance"] == {"store": "synthetic", "epochs": 0}
    genres = client.get("/v1/genres").json()["genres"]
    assert [g["genre"] for g in genres] == GENRES and genres[1]["threshold"] == 0.6
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["workers"] == 2
    assert client.get("/docs").status_code == 200
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
    assert '<input type="file" id="file"' in page.text and '<label for="file"' in page.text
    assert "https://" not in page.text and "src=" not in page.text  # nothing fetched from elsewhere
    assert _one_line_error(client.get("/nowhere"), 404)


def test_an_api_key_is_needed_except_for_health(bare_model_path, audio_files):
    app = create_app(bare_model_path, ServeConfig(workers=1, api_key="s3cret"))
    with TestClient(app) as c:
        assert "API key" in _one_line_error(c.get("/v1/model"), 401)
        assert _one_line_error(c.get("/v1/genres", headers={"X-API-Key": "wrong"}), 401)
        assert _one_line_error(_post(c, audio_files["mp3"], headers={"Authorization": "Bearer nope"}), 401)
        assert c.get("/healthz").status_code == 200
        assert c.get("/v1/model", headers={"X-API-Key": "s3cret"}).json()["has_thresholds"] is False
        r = _post(c, audio_files["mp3"], headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json()["chosen"] is None  # no thresholds: no decision


def test_serve_consistent_answers_the_consistent_probabilities_of_tagger(audio_files, tmp_path):
    torch.manual_seed(1)  # Death-Metal above Metal and Rock on the tone
    config = TransformerConfig(n_genres=4, n_layers=1, n_heads=2, d_ff=32, head_factor=1)
    genres, ids, parents = ["Jazz", "Rock", "Metal", "Death-Metal"], [4, 12, 31, 101], [0, 0, 12, 31]
    path = ModelFile(model_from_config(config).eval(), config, genres, ids, genre_parents=parents).save(
        tmp_path / "model.safetensors"
    )
    upload = audio_files["mp3"]
    expected = Tagger.load(path, device="cpu", consistent=True).predict(upload, timeline=10)
    raw = Tagger.load(path, device="cpu").predict(upload).probabilities
    assert not np.allclose(raw, expected.probabilities, atol=1e-3)  # a real change to find in the answer
    with TestClient(create_app(path, ServeConfig(workers=1, consistent=True))) as c:
        assert c.get("/v1/model").json()["consistent"] is True
        r = _post(c, upload).json()
    np.testing.assert_allclose([r["probabilities"][g] for g in genres], expected.probabilities, atol=1e-4)
    for segment, row in zip(r["timeline"]["segments"], expected.timeline.probabilities):
        assert segment["genres"][0]["probability"] == pytest.approx(row.max(), abs=1e-4)


def crash_or_hang(job):
    """A decoder worker that dies on an upload starting with CRASH and hangs on one starting with HANG."""
    with open(job[1], "rb") as f:
        head = f.read(5)
    if head == b"CRASH":
        os._exit(1)
    if head == b"HANG!":
        time.sleep(600)
    yield from decode_file(job)


def test_a_crashing_or_hanging_decoder_costs_its_request_not_the_server(model_path, audio_files):
    app = create_app(model_path, ServeConfig(workers=1, timeout=3.0), work=crash_or_hang)
    with TestClient(app) as c:
        crash = c.post("/v1/predict", files={"file": ("bad.mp3", b"CRASH" + b"\0" * 1000)})
        assert "decoder crashed" in _one_line_error(crash, 500)
        assert c.get("/healthz").json()["status"] == "ok"
        hang = c.post("/v1/predict", files={"file": ("slow.mp3", b"HANG!" + b"\0" * 1000)})
        assert "timed out" in _one_line_error(hang, 504)
        assert _post(c, audio_files["mp3"]).status_code == 200  # a fresh worker took over


def test_serve_help_names_its_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and all(o in out for o in ("--host", "--port", "--max-upload-mb", "--api-key"))


# --- a real server ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    """`python -m genreclf serve` on 127.0.0.1 and a free port: (base URL, process)."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w+")  # noqa: SIM115
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    cmd = [sys.executable, "-m", "genreclf", "serve", str(model_path), "--port", str(port), "--workers", "2"]
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # until the model is loaded and both decoders are up
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"genreclf serve exited: {log.read()[-2000:]}")
            try:
                if _get(f"{url}/healthz")["workers_ready"] == 2:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        yield url, process
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_real_server_answers_concurrent_clients_alike_without_growing(server, audio_files):
    import httpx

    url, process = server
    data = {kind: audio_files[kind].read_bytes() for kind in ("mp3", "wav", "flac", "ogg")}
    with httpx.Client(timeout=120) as c:
        expected = {k: c.post(f"{url}/v1/predict", files={"file": (f"a.{k}", d)}).json() for k, d in data.items()}

    def round_(requests: int = 64, clients: int = 16) -> tuple[list[float], float]:
        latencies, failures, kinds = [], [], list(data)

        def client(n: int) -> None:
            with httpx.Client(timeout=120) as c:
                for j in range(n, requests, clients):
                    kind = kinds[j % len(kinds)]
                    start = time.perf_counter()
                    r = c.post(f"{url}/v1/predict", files={"file": (f"a.{kind}", data[kind])})
                    latencies.append(time.perf_counter() - start)
                    if r.status_code != 200 or r.json()["probabilities"] != expected[kind]["probabilities"]:
                        failures.append((r.status_code, r.text[:200]))

        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures, failures[:3]
        assert len(latencies) == requests
        return latencies, time.perf_counter() - start

    rss = []
    for label in ("first", "second"):
        latencies, seconds = round_()
        rss.append(_rss_mb(process.pid))
        p50, p95 = np.percentile(latencies, [50, 95])
        print(
            f"\nserve load, {label} round: 64 requests (25-s clips) from 16 clients in {seconds:.1f} s, "
            f"{64 / seconds:.1f} requests/s, latency p50 {p50:.2f} s p95 {p95:.2f} s, server RSS {rss[-1]:.0f} MB"
        )
    health = _get(f"{url}/healthz")
    print(f"serve load: {health}")
    assert health["status"] == "ok" and health["in_flight"] == 0 and health["waiting"] == 0
    assert rss[1] < 1.25 * rss[0] + 20, f"server memory grew from {rss[0]:.0f} MB to {rss[1]:.0f} MB"


def _chromium() -> tuple[str | None, str]:
    """Return (Chromium's path, why not) for Playwright."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return None, "Playwright for Python is not installed (pip install playwright)"
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None and Path("/usr/bin/chromium").exists():
        path = "/usr/bin/chromium"
    return path, "" if path else "no Chromium (apt-get install chromium)"


def test_the_page_tags_an_upload_and_shows_errors_in_a_real_browser(server, audio_files, tmp_path):
    path, why = _chromium()
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser test must run under CI: {why}")
        pytest.skip(why)
    import httpx
    from playwright.sync_api import sync_playwright

    url, _ = server
    answer = httpx.post(f"{url}/v1/predict", files={"file": ("tone.mp3", audio_files["mp3"].read_bytes())}).json()
    broken = httpx.post(f"{url}/v1/predict", files={"file": ("random.mp3", audio_files["random"].read_bytes())})
    args = ["--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    args += ["--no-first-run"] + (["--no-sandbox"] if os.geteuid() == 0 else [])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=args)
        try:
            page = browser.new_page(viewport={"width": 960, "height": 900})
            outside = []
            page.on("request", lambda r: None if r.url.startswith(url) else outside.append(r.url))
            page.goto(url)
            page.focus("#file")  # the real file input takes keyboard focus
            page.set_input_files("#file", str(audio_files["mp3"]))
            page.wait_for_selector("#bars li", timeout=60_000)
            names = page.locator("#bars li .name").all_inner_texts()
            assert [n.split("✓")[0].strip() for n in names] == [g["genre"] for g in answer["genres"]]
            chosen = page.locator("#bars li.chosen .name").all_inner_texts()
            assert [n.split("✓")[0].strip() for n in chosen] == [
                g["genre"] for g in answer["genres"] if g["genre"] in answer["chosen"]
            ]
            assert page.locator("#timeline svg rect").count() > 0
            page.screenshot(path=str(tmp_path / "serve_page.png"), full_page=True)
            page.set_input_files("#file", str(audio_files["random"]))
            page.wait_for_selector("#status.error", timeout=60_000)
            assert page.inner_text("#status") == broken.json()["error"]
            assert outside == []  # the page needs no network beyond this server
        finally:
            browser.close()
