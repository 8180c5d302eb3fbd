"""vitlab: train, stabilise, compare and inspect Vision Transformers on your own hardware."""

from vitlab.errors import VitlabError

__version__ = "0.1.0"
__all__ = ["VitlabError", "count_parameters", "create_model", "__version__"]


def __getattr__(name: str) -> object:
    """The model functions, imported at first use: `vitlab --help` and `import vitlab.config` load no torch."""
    if name in ("count_parameters", "create_model"):
        from vitlab import models

        return getattr(models, name)
    raise AttributeError(f"module 'vitlab' has no attribute {name!r}")
