"""vitlab: train, stabilise, compare and inspect Vision Transformers on your own hardware."""

from vitlab.errors import VitlabError
from vitlab.models import count_parameters, create_model

__version__ = "0.1.0"
__all__ = ["VitlabError", "count_parameters", "create_model", "load_run", "__version__"]


def __getattr__(name: str) -> object:
    """`vitlab.load_run` (`vitlab.runs.trained.load_trained_run`), imported on first use: it needs the data and runs modules."""
    if name == "load_run":
        from vitlab.runs.trained import load_trained_run

        return load_trained_run
    raise AttributeError(f"module 'vitlab' has no attribute {name!r}")
