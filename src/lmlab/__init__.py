"""lmlab: an inference-first laboratory for language models."""

from lmlab.config import ALIASES, ModelConfig
from lmlab.errors import LmlabError

__version__ = "0.1.0"
__all__ = ["load", "ModelConfig", "LmlabError", "ALIASES", "__version__"]


def __getattr__(name: str):
    # lmlab.load imports torch (about 1.5 s): only when it is asked for, so commands that never
    # touch a model (`lmlab runs list`, `lmlab --help`) start at once.
    if name == "load":
        from lmlab.loading import load

        return load
    raise AttributeError(f"module 'lmlab' has no attribute {name!r}")
