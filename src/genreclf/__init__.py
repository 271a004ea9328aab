"""genreclf: multi-label music genre classification (FMA, GRU vs Transformer)."""

from genreclf.errors import AudioError, GenreclfError
from genreclf.provenance import version as _version

__version__ = _version()  # one source of truth: pyproject.toml, through the package metadata
__all__ = ["AudioError", "GenreclfError", "Tagger", "__version__"]


def __getattr__(name: str):
    # Tagger pulls in torch and the models; import it only when asked for.
    if name == "Tagger":
        from genreclf.predict import Tagger

        return Tagger
    raise AttributeError(f"module 'genreclf' has no attribute {name!r}")
