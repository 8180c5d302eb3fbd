"""vitlab: train, stabilise, compare and inspect Vision Transformers on your own hardware."""

from vitlab.errors import VitlabError
from vitlab.models import count_parameters, create_model

__version__ = "0.1.0"
__all__ = ["VitlabError", "count_parameters", "create_model", "__version__"]
