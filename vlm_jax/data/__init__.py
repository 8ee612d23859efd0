"""vlm_jax.data."""
