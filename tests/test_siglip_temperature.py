"""SigLIP's temperature: the config and the loss docstring agree that t is unclamped (the paper's big_vision
code); CLIP keeps open_clip's clamp at ln 100."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import train_helpers as th
from vlm_jax.models import build_model
from vlm_jax.objectives.contrastive import dense_siglip_loss, siglip_loss


def _logit_scale_at(config, log_scale: float) -> float:
  config.model.text.update({"vocab_size": 100, "max_len": 8})
  model = build_model(config.model)
  batch = {"image": jnp.zeros((2, 16, 16, 3)), "text": jnp.ones((2, 8), jnp.int32)}
  params = model.init(jax.random.PRNGKey(0), batch)["params"]
  params = {**params, "log_logit_scale": jnp.float32(log_scale)}
  return float(model.apply({"params": params}, batch)["logit_scale"])


@pytest.mark.parametrize("arg", ["micro", "tiny", "img=B/16,txt=B,res=224"])
def test_siglip_config_leaves_the_temperature_unclamped(arg):
  config = th.load_config("configs/pretrain/siglip.py", arg)
  assert config.model.max_log_logit_scale is None
  assert build_model(config.model).max_log_logit_scale is None


def test_siglip_model_scale_passes_100_and_clip_stays_clamped():
  siglip = th.load_config("configs/pretrain/siglip.py", "micro")
  np.testing.assert_allclose(_logit_scale_at(siglip, math.log(10.0)), 10.0, rtol=1e-6)  # paper init
  np.testing.assert_allclose(_logit_scale_at(siglip, math.log(200.0)), 200.0, rtol=1e-5)
  clip = th.load_config("configs/pretrain/clip.py", "micro")
  np.testing.assert_allclose(_logit_scale_at(clip, math.log(200.0)), 100.0, rtol=1e-5)


def test_loss_docstring_names_the_choice():
  for fn in (dense_siglip_loss, siglip_loss):
    assert "unclamped" in fn.__doc__ and "max_log_logit_scale = None" in fn.__doc__
