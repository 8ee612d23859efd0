"""vlm_jax.train."""
