"""jaxadapt: batch-effect adaptation for deep models of Cell Painting images, in JAX."""

__version__ = "0.1.0"
