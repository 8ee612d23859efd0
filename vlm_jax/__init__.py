"""vlm_jax: vision-language model pre-training, transfer and distillation in JAX/Flax."""

__version__ = "0.1.0"
