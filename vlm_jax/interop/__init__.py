"""vlm_jax.interop."""
