"""lmlab: an inference-first laboratory for language models."""

from lmlab.config import ALIASES, ModelConfig
from lmlab.errors import LmlabError
from lmlab.loading import load

__version__ = "0.1.0"
__all__ = ["load", "ModelConfig", "LmlabError", "ALIASES", "__version__"]
