"""Shared fixtures: real FMA files shipped in tests/data and small generated corpora."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

DATA = Path(__file__).parent / "data"
REAL_MP3 = DATA / "fma_kevin_macleod_danse_macabre_finale.mp3"  # real FMA track: 21.55 s, 44.1 kHz stereo, ID3 + cover


def write_mp3(path: Path, seconds: float = 3.0, rate: int = 44100, channels: int = 2, seed: int = 0) -> Path:
    """Write a short tonal MP3 test clip and return its path."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t) + 0.05 * rng.standard_normal(len(t))
    x = np.stack([tone] * channels, axis=1).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x, rate, format="MP3", subtype="MPEG_LAYER_III")
    return path


def write_long_wav(path: Path, minutes: int, rate: int = 44100) -> Path:
    """Write `minutes` of mono 16-bit noise a minute at a time (the test never holds it all); return its path."""
    rng = np.random.default_rng(4)
    with sf.SoundFile(path, "w", rate, 1, subtype="PCM_16") as f:
        for _ in range(minutes):
            f.write(0.1 * rng.standard_normal(60 * rate, dtype=np.float32))
    return path


def write_bad_files(folder: Path) -> dict[str, Path]:
    """Write the kinds of broken files a real corpus contains; return them by kind."""
    folder.mkdir(parents=True, exist_ok=True)
    empty = folder / "empty.mp3"
    empty.write_bytes(b"")
    truncated = folder / "truncated.mp3"
    truncated.write_bytes(write_mp3(folder / "full.mp3").read_bytes()[:300])
    noise = folder / "random.mp3"
    noise.write_bytes(np.random.default_rng(1).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    text = folder / "text.wav"
    text.write_text("this is not a wav file\n" * 50)
    return {"empty": empty, "truncated": truncated, "random": noise, "text": text}


def write_nan_features(store_dir: Path, part: str, split: str = "official", seed: int = 0) -> int:
    """Set every feature of the first track of `part` (training/validation) to NaN on disk; return its id."""
    from genreclf.data import split_positions
    from genreclf.store import FeatureStore, part_name

    store = FeatureStore.open(store_dir)
    position = int(split_positions(store, part, split, seed)[0])
    k, row = int(store.index.at[position, "part"]), int(store.index.at[position, "row"])
    features = np.load(store_dir / part_name(k, store.header.n_parts) / "features.npy", mmap_mode="r+")
    features[row] = np.nan  # through the store's memory map, as a corrupt write would leave it
    features.flush()
    return int(store.track_ids[position])


@pytest.fixture(scope="session")
def real_mp3() -> Path:
    return REAL_MP3


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small synthetic FMA-layout corpus: 30 tracks of 4 s (MP3 + tracks.csv + genres.csv)."""
    from genreclf.synth import make_corpus

    return make_corpus(tmp_path_factory.mktemp("corpus"), 30, seconds=4.0, seed=7, workers=2)


@pytest.fixture(scope="session")
def store_dir(corpus, tmp_path_factory) -> Path:
    """The feature store of `corpus`."""
    from genreclf.featurize import featurize

    out = tmp_path_factory.mktemp("store") / "store"
    featurize(corpus, out, workers=2, progress=False)
    return out


@pytest.fixture
def two_torch_threads():
    """Two torch threads for a test: genreclf.twin splits them between two threads of one core each."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module: on a loaded 2-core machine, 2 threads make GRU inference 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
