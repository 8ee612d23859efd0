"""SLIP pre-training (Mu et al. 2022): CLIP plus SimCLR on two augmented views with an MLP head.

  --config=configs/pretrain/slip.py:tiny
  --config=configs/pretrain/slip.py:img=B/16,txt=B,res=224      (SLIP: head 4096 → 256, τ_SimCLR = 0.1)
"""

from vlm_jax.train import config_base as cb


def get_config(arg: str = "tiny"):
  a = cb.parse_arg(arg, variant="full", img="B/16", txt="B", res=224, embed=512)
  c = cb.base_config()
  c.objectives = {"clip": 1.0, "simclr": 1.0}
  c.objective_hparams = {"simclr": {"temperature": 0.1}}
  if a.variant == "tiny":
    c.update(cb.tiny_run())
    c.model = cb.tiny_model()
    c.model.simclr_head = {"hidden": 256, "out": 64}
  else:
    c.update(cb.full_run(a.res))
    c.model = cb.vit_text_model(a.img, a.txt, a.res, a.embed)
    c.model.simclr_head = {"hidden": 4096, "out": 256}
  c.data.view_scale = (0.08, 1.0)
  return c
