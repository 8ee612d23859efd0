"""WiSE-FT (Wortsman et al. 2022): θ(α) = (1 − α)·θ_zeroshot + α·θ_finetuned, α chosen on validation.

  python -m vlm_jax.transfer --config=configs/transfer/wise_ft.py:tiny --workdir=DIR [--config.init.checkpoint=MODEL]

Fine-tunes as configs/transfer/finetune.py, then scores θ(α) for α ∈ {0, 0.1, …, 1} on the target task's
validation split (the kept α) and, after selection, on its test split and on the shifted task `shift_dataset`:
results.json 'candidates' and DIR/plots/wise_ft.png. Default pair: target shifted_hues, shift textured (same 64
classes). DIR holds θ(α) at the chosen α as a full model.
"""

from vlm_jax import config_lib

ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


def get_config(arg=None):
  c = config_lib.finetune_config(arg, {"name": "wise_ft", "alphas": ALPHAS})
  c.shift_dataset = "textured" if c.dataset == "shifted_hues" else ""
  return c
