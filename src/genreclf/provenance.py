"""Where a result came from: genreclf's version and, for a source checkout, its git revision.

Light on purpose (no torch, no Lightning): the report and the model file both use it.
"""

from __future__ import annotations

import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent


def version() -> str:
    """Return the installed genreclf version (from the package metadata), or "unknown"."""
    try:
        return metadata.version("genreclf")
    except metadata.PackageNotFoundError:
        return "unknown"


@lru_cache(maxsize=1)
def git_revision() -> str | None:
    """Return genreclf's git revision ("abc1234", "abc1234-dirty") for a source checkout of genreclf, else None.

    An installed copy inside some other repository (a user's project, a site-packages that happens
    to be under git) must not record that repository's HEAD: the checkout counts only if its top
    level is the folder two levels above the package (src/genreclf) and it holds our pyproject.toml.
    """
    source_root = PACKAGE_ROOT.parent.parent
    try:
        top = _git(["rev-parse", "--show-toplevel"], source_root)
        if top is None or Path(top).resolve() != source_root:
            return None
        pyproject = source_root / "pyproject.toml"
        if not pyproject.is_file() or 'name = "genreclf"' not in pyproject.read_text(encoding="utf-8"):
            return None
        head = _git(["rev-parse", "--short", "HEAD"], source_root)
        if head is None:
            return None
        dirty = _git(["status", "--porcelain", "--untracked-files=no"], source_root)
        return f"{head}-dirty" if dirty else head
    except OSError:
        return None


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance() -> dict:
    """Return {"genreclf": version, "git": revision or None} for a result's metadata."""
    return {"genreclf": version(), "git": git_revision()}
