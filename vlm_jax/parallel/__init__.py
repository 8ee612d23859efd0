"""vlm_jax.parallel."""
