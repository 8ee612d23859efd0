"""`python -m vlm_jax.evaluate …`: the standalone evaluation entry point, see `vlm_jax.evaluate.cli`."""

from vlm_jax.evaluate.cli import run

if __name__ == "__main__":
  run()
