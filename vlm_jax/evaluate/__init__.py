"""vlm_jax.evaluate."""
