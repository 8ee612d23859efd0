"""Pre-training entry point.

  python -m vlm_jax.pretrain --config=configs/pretrain/clip.py:tiny --workdir=DIR [--config.key=value …]

Builds the tokenizer, model, objectives, data stream and evaluators named by the config and runs the one training
loop (`vlm_jax.train.loop`). Rerunning the same command resumes from the newest readable checkpoint in DIR.
"""

from __future__ import annotations

from vlm_jax import preflight
from vlm_jax.cli import ConfigCommand
from vlm_jax.errors import exit_on_user_error

COMMAND = ConfigCommand("configs/pretrain/clip.py:tiny", check=preflight.pretrain)


@exit_on_user_error
def run(argv: list[str] | None = None) -> dict:
  from vlm_jax import runner
  return COMMAND.run(argv, runner.pretrain, zeroshot_summary)


def zeroshot_summary(metrics: dict) -> str | None:
  """A human line for the synthetic zero-shot results (seen / unseen pairs), with chance beside them."""
  if "zeroshot/seen_top1" not in metrics:
    return None
  chance = metrics.get("zeroshot/chance", float("nan"))
  return (f"zero-shot top-1 on held-out images: seen pairs {100 * metrics['zeroshot/seen_top1']:.1f}% | "
          f"unseen pairs {100 * metrics['zeroshot/unseen_top1']:.1f}% | chance {100 * chance:.1f}% "
          f"(step {metrics.get('step')})")


def main() -> None:
  """Console-script entry (`vlm-pretrain`): like `run`, but returns None so the exit status is 0."""
  run()


if __name__ == "__main__":
  main()
