"""Transfer entry point.

  python -m vlm_jax.transfer --config=configs/transfer/coop.py:tiny --workdir=DIR \\
      [--config.init.checkpoint=MODEL_DIR] [--config.dataset=NAME] [--config.shots=16] [--config.seed=1]

Trains the method of `config.method` around a frozen base model and evaluates it (`vlm_jax.transfer.run`).
Rerunning the same command resumes from the newest readable checkpoint in DIR. The last stdout line is one JSON
object: method, dataset, shots, seed, metric, zeroshot/top1, top1 (and base/top1, novel/top1, harmonic_mean);
on a multi-label dataset (--config.dataset=scenes, DualCoOp) metric is "mAP" with mAP and zeroshot/mAP.
"""

from __future__ import annotations

from vlm_jax import preflight
from vlm_jax.cli import ConfigCommand
from vlm_jax.errors import exit_on_user_error

COMMAND = ConfigCommand("configs/transfer/coop.py:tiny", check=preflight.transfer)


def summary(r: dict) -> str:
  m = r.get("metric", "top1")
  label = "top-1" if m == "top1" else m
  line = (f"{r['method']} on {r['dataset']} ({r['shots']} shots, seed {r['seed']}): {label} {100 * r[m]:.1f}% | "
          f"zero-shot {100 * r['zeroshot/' + m]:.1f}% | chance {100 * r['chance']:.1f}%")
  if "harmonic_mean" in r:
    line += f" | base {100 * r['base/top1']:.1f}% novel {100 * r['novel/top1']:.1f}% (H)"
  return line


@exit_on_user_error
def run(argv: list[str] | None = None) -> dict:
  from vlm_jax.transfer.run import transfer
  return COMMAND.run(argv, transfer, summary)


def main() -> None:
  """Console-script entry (`vlm-transfer`)."""
  run()


if __name__ == "__main__":
  main()
