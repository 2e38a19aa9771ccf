"""gendd: Generative Distribution Distillation with an offline, cached teacher."""

from pipeline.errors import GenddError

__all__ = ["GenddError"]
__version__ = "0.1.0"
