"""duomo (多模): image+text foundation models as infrastructure."""

from duomo.api import Pipeline, default_model_name, list_pretrained, load
from duomo.errors import CheckpointError, ConfigError, DuomoError, ImageError, InputError, UnknownModelError
from duomo.models import create_model, list_models
from duomo.version import __version__

__all__ = [
    "__version__",
    "CheckpointError",
    "ConfigError",
    "DuomoError",
    "ImageError",
    "InputError",
    "Pipeline",
    "UnknownModelError",
    "create_model",
    "default_model_name",
    "list_models",
    "list_pretrained",
    "load",
]
