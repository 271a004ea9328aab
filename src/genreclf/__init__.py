"""genreclf: multi-label music genre classification (FMA, GRU vs Transformer)."""

from genreclf.errors import AudioError, GenreclfError

__version__ = "0.1.0"
__all__ = ["AudioError", "GenreclfError", "Tagger", "__version__"]


def __getattr__(name: str):
    # Tagger pulls in torch and the models; import it only when asked for.
    if name == "Tagger":
        from genreclf.predict import Tagger

        return Tagger
    raise AttributeError(f"module 'genreclf' has no attribute {name!r}")
