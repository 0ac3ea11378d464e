"""nbsrc: Vision Transformers for image retrieval (IRT and DToP), the code behind the notebooks.

Layers, each importing only from those before it::

    config/errors -> data -> models -> losses -> train -> eval -> experiment -> analysis -> plots/widgets
"""

from nbsrc.config import ExperimentConfig
from nbsrc.errors import ConfigError, DatasetError, NbsrcError, NonFiniteLossError, RunDirError, WeightsError

__version__ = "0.1.0"
__all__ = [
    "ExperimentConfig",
    "NbsrcError",
    "ConfigError",
    "DatasetError",
    "WeightsError",
    "RunDirError",
    "NonFiniteLossError",
]
