import shutil
import subprocess
import sys
from pathlib import Path

import genreclf
from genreclf import provenance

SRC = Path(genreclf.__file__).resolve().parent


def _git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_version_comes_from_the_package_metadata():
    from importlib.metadata import version

    assert genreclf.__version__ == provenance.version() == version("genreclf")
    pyproject = (SRC.parent.parent / "pyproject.toml").read_text()
    assert f'version = "{genreclf.__version__}"' in pyproject  # the one place it is written


def test_a_copy_installed_inside_another_repository_records_no_git_revision(tmp_path):
    # As a non-editable install into a venv that lives inside a user's own git repository.
    repo = tmp_path / "users_project"
    site = repo / ".venv" / "lib" / "site-packages"
    shutil.copytree(SRC, site / "genreclf", ignore=shutil.ignore_patterns("__pycache__"))
    _git("init", "-q", cwd=repo)
    (repo / "notes.txt").write_text("the user's work\n")
    _git("add", "notes.txt", cwd=repo)
    _git("-c", "user.email=u@example.com", "-c", "user.name=u", "commit", "-qm", "user commit", cwd=repo)
    code = "import genreclf.provenance as p; print(p.git_revision())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )
    assert out.stdout.strip() == "None"


def test_a_source_checkout_records_its_revision_and_whether_it_is_dirty():
    root = SRC.parent.parent
    if not (root / ".git").exists():  # an sdist or wheel: nothing to record
        assert provenance.git_revision() is None
        return
    head = _git("rev-parse", "--short", "HEAD", cwd=root)
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", cwd=root))
    provenance.git_revision.cache_clear()
    assert provenance.git_revision() == (f"{head}-dirty" if dirty else head)
