"""Every pre-training config: the tiny variant trains through the one loop; the full variants build."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tests import train_helpers as th
from vlm_jax import runner
from vlm_jax.errors import UserError

CONFIGS = ["clip", "siglip", "unicl", "slip", "coca", "cappa", "mae", "flava", "filip", "region_word", "clippo"]


VARIANTS = {"flip": {"model.flip_mask_ratio": 0.5}, "accum": {"optimizer.grad_accum_steps": 2},
            "resnet": {"model.image": {"kind": "resnet", "variant": "tiny", "image_size": 32}, "data.image_size": 32}}


@pytest.mark.parametrize("name", CONFIGS + list(VARIANTS))
def test_tiny_config_trains_through_the_loop(tmp_path, name):
  path = f"configs/pretrain/{name if name in CONFIGS else 'clip'}.py"
  extra = VARIANTS.get(name, {})
  config = th.micro_config(path, total_steps=2, **extra)
  last = runner.pretrain(config, str(tmp_path / name), quiet=True)
  assert last["step"] == 2 and np.isfinite(last["loss"]) and last["skipped_steps"] == 0
  objective_keys = {k.split("/")[0] for k in last if "/" in k}
  assert set(config.objectives) <= objective_keys, last


def test_lit_requires_a_checkpoint(tmp_path):
  config = th.micro_config("configs/pretrain/lit.py")
  with pytest.raises(UserError, match="init.checkpoint"):
    runner.pretrain(config, str(tmp_path / "lit"), quiet=True)


@pytest.mark.parametrize("name,arg", [("clip", "img=B/16,txt=B,res=224"), ("siglip", "img=So400m/14,txt=So400m,res=224"),
                                      ("clip", "img=L/14,txt=L,res=224,embed=768")])
def test_full_configs_build_abstractly(name, arg):
  config = th.load_config(f"configs/pretrain/{name}.py", arg)
  model_cfg = config.model.to_dict()
  from vlm_jax.models import build_model
  model = build_model(model_cfg)
  res = config.data.image_size
  batch = {"image": jax.ShapeDtypeStruct((2, res, res, 3), np.float32),
           "text": jax.ShapeDtypeStruct((2, model_cfg["text"]["max_len"]), np.int32)}
  variables = jax.eval_shape(lambda b: model.init(jax.random.PRNGKey(0), b), batch)
  n = sum(np.prod(x.shape) for x in jax.tree.leaves(variables))
  assert n > 80e6, n  # B/16 CLIP ≈ 150M, L/14 ≈ 430M, So400m ≈ 880M
