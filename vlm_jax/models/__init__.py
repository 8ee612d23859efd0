"""vlm_jax.models."""
