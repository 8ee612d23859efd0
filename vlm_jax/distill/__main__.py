"""Distillation entry point.

  python -m vlm_jax.distill --config=configs/distill/vild.py:tiny --workdir=DIR [--config.teacher.checkpoint=MODEL]

Trains the config's method and its baselines with the one training loop (`vlm_jax.distill.run.distill`) and prints,
last, one JSON object of the final metrics (`detection/AP`, `detection/AP50`, `detection/AP50_base`,
`detection/AP50_novel`, `detection/APr`, and `<baseline>/detection/…`; for segmentation configs
`segmentation/miou_base`, `segmentation/miou_novel`, `segmentation/hiou`, … and `teacher/…`, `broadcast/…`,
`<baseline>/…`). Rerunning the same command resumes.
A missing teacher prints one line `error: …` (naming `make demo` and --config.teacher.checkpoint) and exits 2.
"""

from __future__ import annotations

from vlm_jax import preflight
from vlm_jax.cli import ConfigCommand
from vlm_jax.errors import exit_on_user_error

COMMAND = ConfigCommand("configs/distill/vild.py:tiny", check=preflight.distill)


def summary(metrics: dict) -> list[str]:
  """Human lines: base / novel AP50 (detection) or base / novel / harmonic mIoU (segmentation) of the method and of
  each baseline."""
  lines = []
  for prefix in sorted({k[:-len("segmentation/miou_novel")] for k in metrics if k.endswith("segmentation/miou_novel")}):
    who = prefix.rstrip("/") or "method"
    lines.append(f"{who}: mIoU base {100 * metrics[prefix + 'segmentation/miou_base']:.1f} | novel "
                 f"{100 * metrics[prefix + 'segmentation/miou_novel']:.1f} | harmonic "
                 f"{100 * metrics[prefix + 'segmentation/hiou']:.1f}")
  for prefix in sorted({k[:-len("detection/AP50_novel")] for k in metrics if k.endswith("detection/AP50_novel")}):
    who = prefix.rstrip("/") or "method"
    lines.append(f"{who}: AP50 base {100 * metrics[prefix + 'detection/AP50_base']:.1f} | novel "
                 f"{100 * metrics[prefix + 'detection/AP50_novel']:.1f} | AP {100 * metrics[prefix + 'detection/AP']:.1f}")
  return lines


@exit_on_user_error
def run(argv: list[str] | None = None) -> dict:
  from vlm_jax.distill.run import distill
  return COMMAND.run(argv, distill, summary)


def main() -> None:
  """Console-script entry (`vlm-distill`): like `run`, but returns None so the exit status is 0."""
  run()


if __name__ == "__main__":
  main()
