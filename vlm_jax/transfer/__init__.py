"""vlm_jax.transfer."""
