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

from genreclf.atomic import atomic_write_text
from genreclf.errors import GenreclfError
from genreclf.metadata import Genres, audio_path, load_genres

log = logging.getLogger(__name__)

SAMPLE_RATE = 44100  # FMA's MP3s are 44.1 kHz stereo
CHANNELS = 2
MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)  # rates MPEG audio allows
# Genres the corpus uses, most frequent first (Zipf rank); 8 roots, some 3 levels deep.
SYNTH_GENRES = (
    38,
    15,
    12,
    17,
    21,
    10,
    1,
    32,
    76,
    42,
    25,
    103,
    66,
    27,
    236,
    181,
    4,
    5,
    47,
    89,
    362,
    33,
    297,
    811,
    31,
    74,
    240,
)
ZIPF_EXPONENT = 0.6  # genre popularity ~ rank ** -0.6: imbalanced, yet each genre recurs
# A long tail (`synth --genres 99 --zipf 1.0`): the top genre on about a quarter of the tracks, half the genres on
# under 1%, as in FMA (whose top genre is on 23% of tracks and 50 genres on under 0.1%).
SIGNATURE_SEED = 20170401  # genre signatures depend on this and the genre id only, not the corpus seed
_TABLE = 2048  # samples in one period of a wavetable
_HARMONICS = np.arange(1, 9)

# FMA's tracks.csv columns, in FMA's order.
TRACKS_COLUMNS = tuple(
    [
        ("album", c)
        for c in [
            "comments",
            "date_created",
            "date_released",
            "engineer",
            "favorites",
            "id",
            "information",
            "listens",
            "producer",
            "tags",
            "title",
            "tracks",
            "type",
        ]
    ]
    + [
        ("artist", c)
        for c in [
            "active_year_begin",
            "active_year_end",
            "associated_labels",
            "bio",
            "comments",
            "date_created",
            "favorites",
            "id",
            "latitude",
            "location",
            "longitude",
            "members",
            "name",
            "related_projects",
            "tags",
            "website",
            "wikipedia_page",
        ]
    ]
    + [("set", "split"), ("set", "subset")]
    + [
        ("track", c)
        for c in [
            "bit_rate",
            "comments",
            "composer",
            "date_created",
            "date_recorded",
            "duration",
            "favorites",
            "genre_top",
            "genres",
            "genres_all",
            "information",
            "interest",
            "language_code",
            "license",
            "listens",
            "lyricist",
            "number",
            "publisher",
            "tags",
            "title",
        ]
    ]
)

_ADJECTIVES = [
    "Amber",
    "Broken",
    "Crimson",
    "Distant",
    "Electric",
    "Faded",
    "Golden",
    "Hollow",
    "Iron",
    "Lunar",
    "Midnight",
    "Neon",
    "Paper",
    "Quiet",
    "Restless",
    "Silver",
    "Static",
    "Velvet",
    "Wandering",
    "Wild",
]
_NOUNS = [
    "Anchor",
    "Bicycle",
    "Canyon",
    "Comet",
    "Engine",
    "Forest",
    "Harbor",
    "Island",
    "Lantern",
    "Machine",
    "Mirror",
    "Orchard",
    "Pilot",
    "River",
    "Signal",
    "Spiral",
    "Telescope",
    "Tide",
    "Valley",
    "Window",
]
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


@dataclass(frozen=True)
class Signature:
    """A genre's acoustic signature: what a clip of that genre always contains."""

    notes: np.ndarray  # Hz, 3 pitches in the root's register
    pattern: np.ndarray  # which note sounds on each pulse, cycled
    pulse_hz: float  # note (and noise hit) rate, a multiple of the root's beat
    decay: float  # per second: drone-like (small) .. plucked (large)
    tilt: float  # harmonic roll-off exponent: bright (small) .. dark (large)
    odd_only: bool  # clarinet-like timbre with odd harmonics only
    noise_hz: float  # centre of the noise band
    noise_octaves: float  # width of the noise band
    noise_level: float  # noise band level relative to the tone
    noise_offbeat: bool  # noise hits between the notes, else steady


def signature(genre_id: int, root_id: int) -> Signature:
    """Return a genre's fixed signature; genres of one root share its register and beat."""
    root = np.random.default_rng([SIGNATURE_SEED, root_id])
    base_hz = 80.0 * 2 ** root.uniform(0, 2.3)  # 80..394 Hz
    beat_hz = root.uniform(70, 160) / 60
    rng = np.random.default_rng([SIGNATURE_SEED, root_id, genre_id])
    return Signature(
        notes=base_hz * 2 ** ((rng.integers(-5, 6) + np.sort(rng.choice(20, 3, replace=False))) / 12),
        pattern=rng.integers(0, 3, size=int(rng.choice([3, 4, 6, 8]))),
        pulse_hz=beat_hz * float(rng.choice([0.5, 1.0, 2.0, 4.0])),
        decay=float(rng.uniform(1.5, 25.0)),
        tilt=float(rng.uniform(0.4, 2.6)),
        odd_only=bool(rng.random() < 0.3),
        noise_hz=float(300 * 2 ** rng.uniform(0, 4.5)),  # 300..6800 Hz
        noise_octaves=float(rng.uniform(0.2, 0.9)),
        noise_level=float(rng.uniform(0.05, 0.5)),
        noise_offbeat=bool(rng.random() < 0.6),
    )


def _wavetable(tilt: float, odd_only: bool, n_harmonics: int) -> np.ndarray:
    """Return one period of a harmonic waveform (the timbre), peak-normalised."""
    harmonics = _HARMONICS[: max(1, n_harmonics)]
    amps = harmonics.astype(np.float64) ** -tilt
    if odd_only:
        amps[1::2] = 0.0
    phase = np.arange(_TABLE) / _TABLE
    table = (amps[:, None] * np.sin(2 * np.pi * harmonics[:, None] * phase)).sum(axis=0)
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
        sig = signature(genre_id, root_of[genre_id])
        notes = sig.notes * 2 ** ((spec.transpose + rng.normal(0, 0.3)) / 12)
        pulse_hz = np.float32(sig.pulse_hz * spec.tempo)
        beats = (t + np.float32(rng.uniform(0, 2))) * pulse_hz
        step = beats.astype(np.int64)
        frac = beats - step
        # Each note keeps its frequency for one pulse; the phase runs on in float64 so it stays clean.
        phase = np.cumsum(notes[sig.pattern[step % len(sig.pattern)]] / sample_rate) % 1.0
        below_nyquist = int(0.45 * sample_rate / notes.max())  # no aliased harmonics
        table = _wavetable(sig.tilt + spec.brightness, sig.odd_only, below_nyquist)
        layer = table[(phase * _TABLE).astype(np.int64)] * np.exp(np.float32(-sig.decay / pulse_hz) * frac)
        turned = white * np.complex64(np.exp(1j * rng.uniform(0, 2 * np.pi)))  # a fresh noise draw per layer
        noise = _band(turned, log_freqs, sig.noise_hz, sig.noise_octaves, n)
        if sig.noise_offbeat:
            noise *= np.exp(np.float32(-12.0) * ((frac + np.float32(0.5)) % 1))
        layer += np.float32(sig.noise_level) * noise
        layer *= np.float32(rng.uniform(0.5, 1.0))
        pan = rng.uniform(0.15, 0.85) * np.pi / 2
        left += np.float32(np.cos(pan)) * layer
        right += np.float32(np.sin(pan)) * layer
    # A tone that belongs to no genre and broadband background noise, so no single peak decides.
    hum_hz = np.float32(100 * 2 ** rng.uniform(0, 4.3))
    hum = np.float32(rng.uniform(0.0, 0.4)) * np.sin(np.float32(2 * np.pi) * hum_hz * t)
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


def _artist(
    rng: np.random.Generator, artist_id: int, created: datetime, style: list[int], title: dict[int, str]
) -> dict:
    """Return an artist's FMA fields; bio and members hold newlines, as FMA's often do."""
    name = _name(rng) if rng.random() < 0.5 else f"The {_name(rng)}s"
    place, lat, lon = _PLACES[int(rng.integers(len(_PLACES)))]
    first = title[style[0]].lower() if style else "their own"
    return {
        "active_year_begin": f"{rng.integers(1970, 2012)}-01-01 00:00:00" if rng.random() < 0.4 else "",
        "active_year_end": "",
        "associated_labels": f"{rng.choice(_NOUNS)} Records" if rng.random() < 0.5 else "",
        "bio": f"<p>{name} make {first} music.</p>\n<p>From {place or 'somewhere'}.</p>",
        "comments": int(rng.integers(0, 5)),
        "date_created": _when(created),
        "favorites": int(rng.integers(0, 30)),
        "id": artist_id,
        "latitude": lat,
        "location": place,
        "longitude": lon,
        "members": "\n".join(_name(rng) for _ in range(int(rng.integers(1, 4)))),
        "name": name,
        "related_projects": "",
        "tags": str([name.lower()]),
        "website": f"http://www.{name.lower().replace(' ', '')}.example.org",
        "wikipedia_page": "",
    }


def _album(rng: np.random.Generator, album_id: int, created: datetime) -> dict:
    """Return an album's FMA fields; "tracks" is counted up as tracks are added."""
    released = datetime(created.year, created.month, created.day) - timedelta(days=int(rng.integers(0, 400)))
    return {
        "comments": int(rng.integers(0, 3)),
        "date_created": _when(created),
        "date_released": _when(released),
        "engineer": "",
        "favorites": int(rng.integers(0, 5)),
        "id": album_id,
        "information": "<p></p>",
        "listens": int(rng.integers(100, 20000)),
        "producer": "",
        "tags": "[]",
        "title": _name(rng),
        "tracks": 0,
        "type": str(rng.choice(["Album", "Single Tracks", "Live Performance"], p=[0.8, 0.15, 0.05])),
        "_created": created,
    }


def _track(rng: np.random.Generator, mine: list[int], album: dict, genres: Genres, seconds: float) -> dict:
    """Return a track's FMA fields, with genres_all and genre_top derived from its genres as FMA does."""
    title = dict(zip(genres.ids.tolist(), genres.names))
    root_of = dict(zip(genres.ids.tolist(), genres.top_level.tolist()))
    ancestry = set(mine)
    for genre_id in mine:
        ancestry.update(genres.ancestors(genre_id))
    roots = {root_of[g] for g in mine}
    created = album["_created"] + timedelta(minutes=album["tracks"])
    return {
        "bit_rate": int(rng.choice([256000, 320000])),
        "comments": 0,
        "composer": "",
        "date_created": _when(created),
        "date_recorded": _when(created.replace(hour=0, minute=0, second=0)),
        "duration": int(seconds) + int(rng.integers(30, 400)),  # the full track; the clip is an excerpt
        "favorites": int(rng.integers(0, 6)),
        "genre_top": title[roots.pop()] if len(roots) == 1 else "",
        "genres": str(mine),
        "genres_all": str(list(ancestry)),  # FMA writes genres_all in Python's set order
        "information": "",
        "interest": int(rng.integers(100, 5000)),
        "language_code": "en",
        "license": str(rng.choice(_LICENSES)),
        "listens": int(rng.integers(20, 3000)),
        "lyricist": "",
        "number": album["tracks"],
        "publisher": "",
        "tags": "[]",
        "title": _name(rng),
    }


def palette_of(genres: Genres, n_genres: int | None = None) -> np.ndarray:
    """Return the genre ids a corpus uses, most frequent first: SYNTH_GENRES (n_genres None), the first
    n_genres of them, or SYNTH_GENRES and then FMA's other genres under the same roots, by id."""
    palette = np.array(SYNTH_GENRES, dtype=np.int64)
    if n_genres is None:
        return palette
    roots = set(genres.top_level[genres.columns(palette)].tolist())
    others = [int(g) for g, root in zip(genres.ids, genres.top_level) if root in roots and g not in SYNTH_GENRES]
    if not 1 <= n_genres <= len(palette) + len(others):
        raise GenreclfError(f"a corpus can use 1 to {len(palette) + len(others)} genres, not {n_genres}")
    return np.array([*palette, *others], dtype=np.int64)[:n_genres]


def synth_metadata(
    n_tracks: int,
    seconds: float,
    seed: int,
    genres: Genres,
    n_genres: int | None = None,
    zipf: float = ZIPF_EXPONENT,
) -> tuple[pd.DataFrame, list[ClipSpec]]:
    """Return an FMA-format tracks table (as pandas reads tracks.csv) and the clip of each track.

    The genres are palette_of(genres, n_genres), popular ~ rank ** -zipf.
    """
    rng = np.random.default_rng(seed)
    palette = palette_of(genres, n_genres)
    weights = np.arange(1, len(palette) + 1) ** -zipf
    weights /= weights.sum()
    roots = genres.top_level[genres.columns(palette)]
    title = dict(zip(genres.ids.tolist(), genres.names))
    mean_size = min(max(n_tracks / 10, 2.0), 4.0)  # tracks per artist, on average
    sizes: list[int] = []
    while sum(sizes) < n_tracks:
        sizes.append(min(n_tracks - sum(sizes), int(rng.geometric(1 / mean_size))))
    splits = _assign_splits(rng, sizes)

    rows, specs = [], []
    track_id, album_id, moment = 2, 0, datetime(2008, 11, 26, 1, 42, 32)
    for index, size in enumerate(sizes):
        moment += timedelta(days=float(rng.uniform(0, 20)), seconds=int(rng.integers(60, 3600)))
        style = _genre_set(rng, palette, weights, roots)
        artist = _artist(rng, index + 1, moment, style, title)
        voice = {  # what makes this artist sound like itself
            "transpose": rng.uniform(-2, 2),
            "tempo": rng.uniform(0.92, 1.08),
            "brightness": rng.uniform(-0.3, 0.3),
        }
        albums = []
        for _ in range(1 + int(size > 3) + int(size > 8)):
            album_id += int(rng.geometric(0.5))
            albums.append(_album(rng, album_id, moment + timedelta(minutes=int(rng.integers(1, 600)))))
        for album_index in np.sort(rng.integers(0, len(albums), size)):
            album = albums[album_index]
            album["tracks"] += 1
            mine = list(style)
            if rng.random() < 0.01:
                mine = []  # FMA has a few tracks without any genre
            elif rng.random() < 0.2:  # a track that strays from its artist's style
                extra = _genre_set(rng, palette, weights, roots)[:1]
                mine = sorted(set(mine[1:] if len(mine) > 1 and rng.random() < 0.5 else mine + extra))
            track = _track(rng, mine, album, genres, seconds)
            # FMA's small and medium subsets hold only tracks with a genre_top.
            u = rng.random() if track["genre_top"] else 1.0
            subset = "small" if u < 0.25 else "medium" if u < 0.6 else "large"
            rows.append(
                (
                    track_id,
                    {
                        "album": album,
                        "artist": artist,
                        "track": track,
                        "set": {"split": splits[index], "subset": subset},
                    },
                )
            )
            specs.append(ClipSpec(track_id, tuple(mine), seconds, seed, **voice))
            track_id += 1 if rng.random() < 0.7 else 1 + int(rng.geometric(0.25))
    # Album track counts are final only now, so the rows are flattened last.
    table = pd.DataFrame(
        [[parts[group][field] for group, field in TRACKS_COLUMNS] for _, parts in rows],
        index=pd.Index([tid for tid, _ in rows], name="track_id"),
        columns=pd.MultiIndex.from_tuples(TRACKS_COLUMNS),
    )
    return table, specs


# ---------------------------------------------------------------------------- corpus


def make_corpus(
    out_dir: str | Path,
    n_tracks: int,
    seconds: float = 30.0,
    seed: int = 0,
    workers: int | None = None,
    sample_rate: int = SAMPLE_RATE,
    channels: int = CHANNELS,
    n_genres: int | None = None,
    zipf: float = ZIPF_EXPONENT,
) -> Path:
    """Write a synthetic FMA corpus (fma_metadata/ and fma_large/) under out_dir and return out_dir.

    n_genres and zipf: the genres used and their imbalance (see synth_metadata); by default the 27 of
    SYNTH_GENRES, mildly imbalanced.

    The same seed gives the same files, byte for byte, whatever the number of workers.
    sample_rate and channels trade realism for speed: MP3 encoding dominates the run time.
    Workers are spawned processes, so a script calling this needs the usual
    `if __name__ == "__main__":` guard.
    """
    if n_tracks < 1 or seconds <= 0:
        raise GenreclfError(f"need at least one track and a positive length, got {n_tracks} tracks of {seconds} s")
    if sample_rate not in MP3_RATES or channels not in (1, 2):
        raise GenreclfError(
            f"cannot write {channels}-channel MP3 at {sample_rate} Hz: "
            f"use 1 or 2 channels and one of the rates {MP3_RATES}"
        )
    out = Path(out_dir)
    metadata_dir, audio_dir = out / "fma_metadata", out / "fma_large"
    metadata_dir.mkdir(parents=True, exist_ok=True)
    genres = load_genres()
    if not zipf >= 0:
        raise GenreclfError(f"the Zipf exponent must be >= 0, got {zipf}")
    table, specs = synth_metadata(n_tracks, seconds, seed, genres, n_genres, zipf)
    with resources.as_file(resources.files("genreclf") / "assets" / "genres.csv") as packaged:
        shutil.copyfile(packaged, metadata_dir / "genres.csv")
    atomic_write_text(metadata_dir / "tracks.csv", table.to_csv(lineterminator="\n"))

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
