"""A synthetic FMA-shaped corpus in FMA's real file formats, for the demo and the tests.

make_corpus writes fma_metadata/tracks.csv (FMA's 52 columns and 3 header rows),
fma_metadata/genres.csv (the packaged copy) and fma_large/AAA/AAABBB.mp3 clips
(44.1 kHz stereo). Each genre has an acoustic signature (register, note pattern,
pulse rate, harmonic timbre, a noise band); genres under one root share register
and tempo, so the hierarchy is audible too. A clip mixes the signatures of its
genres with per-artist transposition, tempo and brightness, per-track detuning,
a distractor tone and background noise: learnable, but not one frequency lookup.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.fft
import soundfile as sf
from tqdm import tqdm

from genreclf.errors import GenreclfError
from genreclf.metadata import Genres, audio_path, load_genres

log = logging.getLogger(__name__)

SAMPLE_RATE = 44100  # FMA's MP3s are 44.1 kHz stereo
CHANNELS = 2
MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)  # rates MPEG audio allows
# Genres the corpus uses, most frequent first (Zipf rank); 8 roots, some 3 levels deep.
SYNTH_GENRES = (
    38, 15, 12, 17, 21, 10, 1, 32, 76, 42, 25, 103, 66, 27,
    236, 181, 4, 5, 47, 89, 362, 33, 297, 811, 31, 74, 240,
)
ZIPF_EXPONENT = 0.7  # genre popularity ~ rank ** -0.7: imbalanced, yet each genre recurs
SIGNATURE_SEED = 20170401  # genre signatures depend on this and the genre id only, not the corpus seed
_TABLE = 2048  # samples in one period of a wavetable
_HARMONICS = np.arange(1, 9)

# FMA's tracks.csv columns, in FMA's order.
TRACKS_COLUMNS = tuple(
    [("album", c) for c in (
        "comments date_created date_released engineer favorites id information listens "
        "producer tags title tracks type").split()]
    + [("artist", c) for c in (
        "active_year_begin active_year_end associated_labels bio comments date_created favorites "
        "id latitude location longitude members name related_projects tags website "
        "wikipedia_page").split()]
    + [("set", "split"), ("set", "subset")]
    + [("track", c) for c in (
        "bit_rate comments composer date_created date_recorded duration favorites genre_top "
        "genres genres_all information interest language_code license listens lyricist number "
        "publisher tags title").split()]
)

_ADJECTIVES = (
    "Amber Broken Crimson Distant Electric Faded Golden Hollow Iron Lunar Midnight Neon "
    "Paper Quiet Restless Silver Static Velvet Wandering Wild"
).split()
_NOUNS = (
    "Anchor Bicycle Canyon Comet Engine Forest Harbor Island Lantern Machine Mirror Orchard "
    "Pilot River Signal Spiral Telescope Tide Valley Window"
).split()
_PLACES = (
    ("Portland, OR", 45.5234515, -122.6762071),
    ("Chicago, IL", 41.8781136, -87.6297982),
    ("New York, NY", 40.7143528, -74.0059731),
    ("Berlin, Germany", 52.5200066, 13.404954),
    ("Montreal, Canada", 45.5088400, -73.5878100),
    ("", None, None),
)
_LICENSES = (
    "Attribution-NonCommercial-ShareAlike 3.0 International",
    "Attribution-Noncommercial-Share Alike 3.0 United States",
    "Attribution-NonCommercial-NoDerivatives (aka Music Sharing) 3.0 International",
    "Attribution 4.0 International",
)


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to render one clip; rendering depends on nothing else."""

    track_id: int
    genres: tuple[int, ...]  # the track's ('track', 'genres') ids
    seconds: float  # clip length
    seed: int  # corpus seed; with track_id it seeds the clip's own random generator
    transpose: float  # artist's transposition in semitones
    tempo: float  # artist's tempo factor
    brightness: float  # artist's harmonic tilt (> 0 darker, < 0 brighter)


# ---------------------------------------------------------------------------- audio


def _signature(genre_id: int, root_id: int) -> dict:
    """Return a genre's fixed acoustic signature; the root's register and tempo are shared."""
    root = np.random.default_rng([SIGNATURE_SEED, root_id])
    base_hz = 80.0 * 2 ** root.uniform(0, 2.3)  # 80..394 Hz register of the root
    beat_hz = root.uniform(70, 160) / 60
    rng = np.random.default_rng([SIGNATURE_SEED, root_id, genre_id])
    return {
        "notes": base_hz * 2 ** ((rng.integers(-5, 6) + np.sort(rng.choice(20, 3, replace=False))) / 12),
        "pattern": rng.integers(0, 3, size=int(rng.choice([3, 4, 6, 8]))),
        "pulse_hz": beat_hz * float(rng.choice([0.5, 1.0, 2.0, 4.0])),
        "decay": float(rng.uniform(1.5, 25.0)),  # per second: drone-like .. plucked
        "tilt": float(rng.uniform(0.4, 2.6)),  # harmonic roll-off exponent
        "odd_only": bool(rng.random() < 0.3),
        "noise_hz": float(300 * 2 ** rng.uniform(0, 4.5)),  # noise band centre, 300..6800 Hz
        "noise_octaves": float(rng.uniform(0.2, 0.9)),
        "noise_level": float(rng.uniform(0.05, 0.5)),
        "noise_offbeat": bool(rng.random() < 0.6),  # noise hits between the notes, else steady
    }


def _wavetable(tilt: float, odd_only: bool) -> np.ndarray:
    """Return one period of a harmonic waveform (the timbre), peak-normalised."""
    amps = _HARMONICS.astype(np.float64) ** -tilt
    if odd_only:
        amps[1::2] = 0.0
    phase = np.arange(_TABLE) / _TABLE
    table = (amps[:, None] * np.sin(2 * np.pi * _HARMONICS[:, None] * phase)).sum(axis=0)
    return (table / np.abs(table).max()).astype(np.float32)


def _band(white: np.ndarray, log_freqs: np.ndarray, centre: float, octaves: float, n: int) -> np.ndarray:
    """Return white noise (given as its spectrum) filtered to a band around centre, unit RMS."""
    gain = np.exp(-0.5 * ((log_freqs - np.log2(centre)) / (octaves / 2)) ** 2).astype(np.float32)
    x = scipy.fft.irfft(white * gain, n)
    return x / (np.sqrt(np.mean(x**2)) + 1e-9)


def render(spec: ClipSpec, genres: Genres, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Return a clip's float32 samples, shape (n, 2)."""
    rng = np.random.default_rng([spec.seed, spec.track_id])
    n = int(round(spec.seconds * sample_rate))
    t = np.arange(n, dtype=np.float32) / np.float32(sample_rate)
    freqs = scipy.fft.rfftfreq(n, 1 / sample_rate).astype(np.float32)
    log_freqs = np.log2(np.maximum(freqs, 1.0))
    white = scipy.fft.rfft(rng.standard_normal(n, dtype=np.float32))
    left = np.zeros(n, dtype=np.float32)
    right = np.zeros(n, dtype=np.float32)
    root_of = dict(zip(genres.ids.tolist(), genres.top_level.tolist()))
    for genre_id in spec.genres:
        sig = _signature(genre_id, root_of[genre_id])
        notes = sig["notes"] * 2 ** ((spec.transpose + rng.normal(0, 0.3)) / 12)
        pulse_hz = np.float32(sig["pulse_hz"] * spec.tempo)
        beats = (t + np.float32(rng.uniform(0, 2))) * pulse_hz
        step = beats.astype(np.int64)
        frac = beats - step
        # Each note keeps its frequency for one pulse; the phase runs on in float64 so it stays clean.
        phase = np.cumsum(notes[sig["pattern"][step % len(sig["pattern"])]] / sample_rate) % 1.0
        table = _wavetable(sig["tilt"] + spec.brightness, sig["odd_only"])
        layer = table[(phase * _TABLE).astype(np.int64)] * np.exp(np.float32(-sig["decay"] / pulse_hz) * frac)
        turned = white * np.complex64(np.exp(1j * rng.uniform(0, 2 * np.pi)))  # a fresh noise draw per layer
        noise = _band(turned, log_freqs, sig["noise_hz"], sig["noise_octaves"], n)
        if sig["noise_offbeat"]:
            noise *= np.exp(np.float32(-12.0) * ((frac + np.float32(0.5)) % 1))
        layer += np.float32(sig["noise_level"]) * noise
        layer *= np.float32(rng.uniform(0.5, 1.0))
        pan = rng.uniform(0.15, 0.85) * np.pi / 2
        left += np.float32(np.cos(pan)) * layer
        right += np.float32(np.sin(pan)) * layer
    # A tone that belongs to no genre and broadband background noise, so no single peak decides.
    hum = np.float32(rng.uniform(0.0, 0.4)) * np.sin(np.float32(2 * np.pi * 100 * 2 ** rng.uniform(0, 4.3)) * t)
    pink = scipy.fft.irfft(white / np.sqrt(np.maximum(freqs, np.float32(20.0))), n)
    pink *= np.float32(rng.uniform(0.05, 0.3) / (np.sqrt(np.mean(pink**2)) + 1e-9))
    mix = np.stack([left + hum + pink, right + hum + pink[::-1]], axis=1)
    return mix * np.float32(rng.uniform(0.3, 0.9) / (np.abs(mix).max() + 1e-9))


def _write_clip(job: tuple[ClipSpec, Genres, Path, int, int]) -> int:
    """Render one clip and write it as MP3 atomically (temp file, then rename); return its track id."""
    spec, genres, path, sample_rate, channels = job
    audio = render(spec, genres, sample_rate)
    if channels == 1:
        audio = audio.mean(axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    os.close(fd)
    try:
        sf.write(tmp, audio, sample_rate, format="MP3", subtype="MPEG_LAYER_III")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return spec.track_id


# ---------------------------------------------------------------------------- metadata


def _name(rng: np.random.Generator) -> str:
    return f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _genre_set(rng: np.random.Generator, palette: np.ndarray, weights: np.ndarray, roots: np.ndarray) -> list[int]:
    """Return an artist's 1-3 genres: popular ones more often, companions mostly from the same root."""
    chosen = [int(rng.choice(palette, p=weights))]
    for _ in range(int(rng.choice([0, 1, 2], p=[0.55, 0.35, 0.10]))):
        allowed = ~np.isin(palette, chosen)
        if rng.random() < 0.7:
            allowed &= roots == roots[palette == chosen[0]][0]
        if not allowed.any():
            break
        chosen.append(int(rng.choice(palette[allowed], p=weights[allowed] / weights[allowed].sum())))
    return sorted(chosen)


def _assign_splits(rng: np.random.Generator, sizes: list[int]) -> list[str]:
    """Give each artist one split so that about 80/10/10 % of the tracks land in training/validation/test."""
    goals = {"training": 0.8, "validation": 0.1, "test": 0.1}
    counts = dict.fromkeys(goals, 0)
    out = [""] * len(sizes)
    placed = 0
    for artist in rng.permutation(len(sizes)):
        placed += sizes[artist]
        split = max(goals, key=lambda s: goals[s] * placed - counts[s])
        counts[split] += sizes[artist]
        out[artist] = split
    return out


def synth_metadata(n_tracks: int, seconds: float, seed: int, genres: Genres) -> tuple[pd.DataFrame, list[ClipSpec]]:
    """Return an FMA-format tracks table and the clip of each track."""
    rng = np.random.default_rng(seed)
    palette = np.array(SYNTH_GENRES, dtype=np.int64)
    weights = np.arange(1, len(palette) + 1) ** -ZIPF_EXPONENT
    weights /= weights.sum()
    cols = genres.columns(palette)
    roots = genres.top_level[cols]
    title = dict(zip(genres.ids.tolist(), genres.names))
    root_of = dict(zip(genres.ids.tolist(), genres.top_level.tolist()))
    mean_size = min(max(n_tracks / 10, 2.0), 7.0)

    sizes: list[int] = []
    while sum(sizes) < n_tracks:
        sizes.append(min(n_tracks - sum(sizes), int(rng.geometric(1 / mean_size))))
    splits = _assign_splits(rng, sizes)

    rows, specs, track_ids = [], [], []
    track_id, album_id, moment = 2, 0, datetime(2008, 11, 26, 1, 42, 32)
    for artist, size in enumerate(sizes):
        artist_id = artist + 1
        name = _name(rng) if rng.random() < 0.5 else f"The {_name(rng)}s"
        place, lat, lon = _PLACES[int(rng.integers(len(_PLACES)))]
        style = _genre_set(rng, palette, weights, roots)
        voice = {"transpose": rng.uniform(-2, 2), "tempo": rng.uniform(0.92, 1.08), "brightness": rng.uniform(-0.3, 0.3)}
        moment += timedelta(days=float(rng.uniform(0, 20)), seconds=int(rng.integers(60, 3600)))
        artist_fields = {
            "active_year_begin": f"{rng.integers(1970, 2012)}-01-01 00:00:00" if rng.random() < 0.4 else "",
            "active_year_end": "",
            "associated_labels": f"{rng.choice(_NOUNS)} Records" if rng.random() < 0.5 else "",
            "bio": f"<p>{name} make {title[style[0]].lower()} music.</p>\n<p>From {place or 'nowhere'}.</p>",
            "comments": int(rng.integers(0, 5)),
            "date_created": _when(moment),
            "favorites": int(rng.integers(0, 30)),
            "id": artist_id,
            "latitude": lat,
            "location": place,
            "longitude": lon,
            "members": f"{rng.choice(_NOUNS)} {rng.choice(_ADJECTIVES)}\n{rng.choice(_NOUNS)} {rng.choice(_ADJECTIVES)}",
            "name": name,
            "related_projects": "",
            "tags": str([name.lower()]),
            "website": f"http://www.{name.lower().replace(' ', '')}.example.org",
            "wikipedia_page": "",
        }
        albums = []
        for _ in range(1 + int(size > 3) + int(size > 8)):
            album_id += 1 + int(rng.geometric(0.5)) - 1
            created = moment + timedelta(minutes=int(rng.integers(1, 600)))
            albums.append({
                "comments": int(rng.integers(0, 3)), "date_created": _when(created),
                "date_released": _when(datetime(created.year, created.month, created.day) - timedelta(days=int(rng.integers(0, 400)))),
                "engineer": "", "favorites": int(rng.integers(0, 5)), "id": album_id,
                "information": "<p></p>", "listens": int(rng.integers(100, 20000)), "producer": "",
                "tags": "[]", "title": _name(rng), "tracks": 0,
                "type": str(rng.choice(["Album", "Single Tracks", "Live Performance"], p=[0.8, 0.15, 0.05])),
            })
        album_of_track = np.sort(rng.integers(0, len(albums), size))
        for album_index in album_of_track:
            album = albums[album_index]
            album["tracks"] += 1
            mine = list(style)
            if rng.random() < 0.01:
                mine = []  # FMA has a few tracks without any genre
            elif rng.random() < 0.2:
                extra = _genre_set(rng, palette, weights, roots)[:1]
                mine = sorted(set(mine[1:] if len(mine) > 1 and rng.random() < 0.5 else mine + extra))
            ancestry = set(mine)
            for g in mine:
                ancestry.update(genres.ancestors(g))
            top = {root_of[g] for g in mine}
            created = datetime.strptime(album["date_created"], "%Y-%m-%d %H:%M:%S") + timedelta(minutes=album["tracks"])
            track = {
                "bit_rate": int(rng.choice([256000, 320000])), "comments": 0, "composer": "",
                "date_created": _when(created), "date_recorded": _when(created.replace(hour=0, minute=0, second=0)),
                "duration": int(rng.integers(60, 420)), "favorites": int(rng.integers(0, 6)),
                "genre_top": title[top.pop()] if len(top) == 1 else "",
                "genres": str(mine), "genres_all": str(list(ancestry)),  # FMA writes genres_all in set order
                "information": "", "interest": int(rng.integers(100, 5000)), "language_code": "en",
                "license": str(rng.choice(_LICENSES)), "listens": int(rng.integers(20, 3000)), "lyricist": "",
                "number": album["tracks"], "publisher": "", "tags": "[]", "title": _name(rng),
            }
            top_ok = track["genre_top"] != ""
            u = rng.random()
            subset = "small" if top_ok and u < 0.25 else "medium" if top_ok and u < 0.6 else "large"
            rows.append((album, artist_fields, {"split": splits[artist], "subset": subset}, track))
            specs.append(ClipSpec(track_id, tuple(mine), seconds, seed, **voice))
            track_ids.append(track_id)
            track_id += 1 if rng.random() < 0.7 else 1 + int(rng.geometric(0.25))
    # Album track counts are final only now, so the rows are flattened last.
    table = pd.DataFrame(
        [[part[field] for part, field in zip(_parts(row), (c[1] for c in TRACKS_COLUMNS))] for row in rows],
        index=pd.Index(track_ids, name="track_id"),
        columns=pd.MultiIndex.from_tuples(TRACKS_COLUMNS),
    )
    return table, specs


def _parts(row: tuple[dict, dict, dict, dict]) -> list[dict]:
    """Return, for each of TRACKS_COLUMNS, the dict of the row that holds its value."""
    group = dict(zip(("album", "artist", "set", "track"), row))
    return [group[c[0]] for c in TRACKS_COLUMNS]


# ---------------------------------------------------------------------------- corpus


def make_corpus(
    out_dir: str | Path,
    n_tracks: int,
    seconds: float = 30.0,
    seed: int = 0,
    workers: int | None = None,
    sample_rate: int = SAMPLE_RATE,
    channels: int = CHANNELS,
) -> Path:
    """Write a synthetic FMA corpus (fma_metadata/ and fma_large/) under out_dir and return out_dir.

    The same seed gives the same corpus whatever the number of workers. sample_rate and
    channels exist to trade realism for speed (MP3 encoding dominates the run time).
    """
    if n_tracks < 1 or seconds <= 0:
        raise GenreclfError(f"need at least one track of positive length, got {n_tracks} tracks of {seconds} s")
    if sample_rate not in MP3_RATES or channels not in (1, 2):
        raise GenreclfError(
            f"cannot write {channels}-channel MP3 at {sample_rate} Hz: use 1 or 2 channels and a rate in {MP3_RATES}"
        )
    out = Path(out_dir)
    metadata_dir, audio_dir = out / "fma_metadata", out / "fma_large"
    metadata_dir.mkdir(parents=True, exist_ok=True)
    genres = load_genres()
    table, specs = synth_metadata(n_tracks, seconds, seed, genres)
    with resources.as_file(resources.files("genreclf") / "data" / "genres.csv") as packaged:
        shutil.copyfile(packaged, metadata_dir / "genres.csv")
    tmp = metadata_dir / ".tracks.csv.tmp"
    table.to_csv(tmp, lineterminator="\n")
    os.replace(tmp, metadata_dir / "tracks.csv")

    jobs = [(spec, genres, audio_path(audio_dir, spec.track_id), sample_rate, channels) for spec in specs]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    with tqdm(total=len(jobs), desc="synthesizing clips", unit="clip", disable=None) as bar:
        if workers == 1:
            for job in jobs:
                _write_clip(job)
                bar.update()
        else:
            # spawn, not fork: safe even when the caller has torch (and its threads) loaded.
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for _ in pool.imap_unordered(_write_clip, jobs):
                    bar.update()
    log.info("wrote %d synthetic tracks of %g s to %s", len(jobs), seconds, out)
    return out
