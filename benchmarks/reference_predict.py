"""The reference study's prediction recipe (its predict.py), rebuilt for benchmarks/predict.py.

    python benchmarks/reference_predict.py {gru,transformer} WEIGHTS.h5 GENRES.txt FILE...

Every file first: librosa.load(sr=16000), zero-padded (or cut) to 120 s, melspectrogram(n_mels=128),
(power_to_db(ref=max) + 40) / 40; then 8 evenly spaced crops of 320 frames of each through the
Keras model (model.predict, its default batch of 32), the mean over a file's crops, and the
top 5 genres of each file printed, one JSON line per file, once all are done.
"""

from __future__ import annotations

import json
import sys

import librosa
import numpy as np
import reference_keras as rk

SECONDS, CROP, N_CROPS = 120, 320, 8


def features(path: str) -> np.ndarray:
    """The reference's log-mel of a file: (frames, 128)."""
    audio, _ = librosa.load(path, sr=16000)
    audio = np.pad(audio, (0, max(0, SECONDS * 16000 - len(audio))))[: SECONDS * 16000]
    mel = librosa.feature.melspectrogram(y=audio, sr=16000, n_mels=128)
    return ((librosa.power_to_db(mel, ref=np.max) + 40) / 40).T


def main() -> None:
    kind, weights, genre_file, paths = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    model = rk.build(kind, compile_model=False)
    model.load_weights(weights)
    with open(genre_file, encoding="utf-8") as f:
        genres = f.read().splitlines()
    specs = [features(p) for p in paths]
    crops = []
    for spec in specs:
        starts = np.linspace(0, len(spec) - CROP, N_CROPS).astype(int)
        crops.extend(spec[s : s + CROP] for s in starts)
    probabilities = model.predict(np.stack(crops), verbose=0).reshape(len(paths), N_CROPS, -1).mean(1)
    for path, p in zip(paths, probabilities):
        top = np.argsort(-p)[:5]
        print(json.dumps({"file": path, "genres": [[genres[i], round(float(p[i]), 4)] for i in top]}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
