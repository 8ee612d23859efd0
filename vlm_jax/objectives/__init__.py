"""vlm_jax.objectives."""
