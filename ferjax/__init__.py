"""ferjax: facial expression recognition with JAX and Flax NNX."""

__version__ = "0.1.0"
