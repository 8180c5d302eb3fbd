"""vitlab: train, stabilise, compare and inspect Vision Transformers on your own hardware."""

from vitlab.errors import VitlabError

__version__ = "0.1.0"
__all__ = ["VitlabError", "count_parameters", "create_model", "load_run", "__version__"]


def __getattr__(name: str) -> object:
    """What needs torch, imported at first use: `vitlab --help` and `import vitlab.config` load no torch.

    `load_run` is `vitlab.runs.trained.load_trained_run`; `count_parameters` and `create_model` are vitlab.models'.
    """
    if name == "load_run":
        from vitlab.runs.trained import load_trained_run

        return load_trained_run
    if name in ("count_parameters", "create_model"):
        from vitlab import models

        return getattr(models, name)
    raise AttributeError(f"module 'vitlab' has no attribute {name!r}")
