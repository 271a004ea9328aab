"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np


def _temporary(path: Path) -> Path:
    """Return a temporary name beside `path`, unique per machine and process (run folders may be shared)."""
    return path.with_name(f".{path.name}.tmp.{socket.gethostname()}.{os.getpid()}")


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never half."""
    tmp = _temporary(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _replace_with(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a temporary file beside `path` with `write`, fsync it, then rename it onto `path`."""
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Save `array` as .npy atomically."""
    _replace_with(path, lambda f: np.save(f, array))


def atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    """Save `arrays` as a compressed .npz atomically."""
    _replace_with(path, lambda f: np.savez_compressed(f, **arrays))


def atomic_save_png(path: Path, figure) -> None:
    """Save a matplotlib Figure as a PNG atomically."""
    _replace_with(path, lambda f: figure.savefig(f, format="png"))
