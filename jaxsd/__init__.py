"""jaxsd: on-policy self-distillation and group-relative RL for LLMs in JAX."""

__version__ = "0.1.0"
