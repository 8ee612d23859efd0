"""vlm_jax.distill."""
