"""Model FLOPs count the backward only for trainable parameters: a locked LiT image tower costs its forward once.

XLA's count (lowered value_and_grad w.r.t. the trainable parameters) and the analytic count agree within 10 % on
a frozen (LiT, `frozen='^img/'`) and an unfrozen (CLIP) config, and freezing the image tower removes about twice
its forward FLOPs. The configs are the `micro` variants with towers widened to 256: at width 32 the elementwise
ops (LayerNorm, GELU, softmax), which the analytic count leaves out, are ~15 % of a step. No timings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import train_helpers as th
from vlm_jax.errors import UserError
from vlm_jax.models import build_model
from vlm_jax.objectives import make_loss_fn
from vlm_jax.train import flops

B, RES, TEXT_LEN, WIDTH = 16, 16, 24, 256


def _setup(path: str, width: int | None = WIDTH):
  config = th.load_config(path, "micro")
  tower = {"width": width, "depth": 2, "mlp_dim": 4 * width, "num_heads": 4} if width else {}
  config.model.image.update(tower)
  config.model.text.update({**tower, "vocab_size": 100, "max_len": TEXT_LEN})
  if width:
    config.model.embed_dim = width
  model = build_model(config.model)
  loss_fn = make_loss_fn(config.objectives, config.objective_hparams)
  batch = {"image": jax.ShapeDtypeStruct((B, RES, RES, 3), jnp.float32),
           "text": jax.ShapeDtypeStruct((B, TEXT_LEN), jnp.int32)}
  return config, model, loss_fn, batch


def _image_forward_flops(model, batch) -> float:
  """XLA's forward FLOPs per sample of `encode_image` (image tower, projection, normalisation)."""
  variables = jax.eval_shape(lambda b: model.init(jax.random.PRNGKey(0), b), batch)
  lowered = jax.jit(lambda v, x: model.apply(v, x, method=model.encode_image)).lower(variables, batch["image"])
  return flops.lowered_flops(lowered) / B


@pytest.fixture(scope="module")
def counts():
  out = {}
  for name in ("lit", "clip"):
    config, model, loss_fn, batch = _setup(f"configs/pretrain/{name}.py")
    frozen = config.get("frozen") or None
    out[name] = {
        "frozen": frozen, "model": model, "batch": batch,
        "xla": flops.xla_model_flops_per_step(model, loss_fn, batch, frozen=frozen) / B,
        "analytic": flops.analytic_train_flops_per_sample(model, (RES, RES, 3), TEXT_LEN, frozen=frozen),
    }
  return out


def test_lit_config_freezes_the_image_tower(counts):
  assert counts["lit"]["frozen"] == r"^img/" and counts["clip"]["frozen"] is None


@pytest.mark.parametrize("name", ["lit", "clip"])
def test_xla_count_matches_analytic(name, counts):
  c = counts[name]
  print(f"{name}: train FLOPs/sample XLA {c['xla'] / 1e6:.1f} M, analytic {c['analytic'] / 1e6:.1f} M")
  assert abs(c["xla"] / c["analytic"] - 1) < 0.10


def test_frozen_tower_costs_its_forward_once(counts):
  """Same towers: the LiT count is the CLIP count less about 2 × the image tower's forward (its backward)."""
  lit, clip = counts["lit"], counts["clip"]
  image_forward = _image_forward_flops(clip["model"], clip["batch"])
  saved = clip["xla"] - lit["xla"]
  print(f"saved {saved / 1e6:.1f} M FLOPs/sample = {saved / image_forward:.2f} x the image forward")
  assert abs(saved / (2 * image_forward) - 1) < 0.10
  # the analytic rule: the image tower counts 1× instead of 3×
  model = clip["model"]
  tokens = (RES // model.img.patch_size) ** 2
  tower = (flops.transformer_forward_flops(tokens, WIDTH, 2, 4 * WIDTH)
           + 2.0 * tokens * model.img.patch_size ** 2 * 3 * WIDTH)
  np.testing.assert_allclose(clip["analytic"] - lit["analytic"], 2 * tower, rtol=1e-9)


def test_throughput_metrics_of_frozen_and_unfrozen(counts):
  """MFU is linear in the model FLOPs: the LiT run's MFU is lower by the ratio of the counts at equal speed."""
  seconds, steps, devices, peak = 2.0, 10, 8, 1e12
  metrics = {name: flops.throughput_metrics(B * steps, seconds, counts[name]["xla"] * B, steps, devices, peak)
             for name in ("lit", "clip")}
  for name, m in metrics.items():
    per_device = counts[name]["xla"] * B * steps / seconds / devices
    np.testing.assert_allclose(m["tflops_per_device"], per_device / 1e12, rtol=1e-12)
    np.testing.assert_allclose(m["mfu"], per_device / peak, rtol=1e-12)
    assert m["images_per_sec"] == B * steps / seconds
  np.testing.assert_allclose(metrics["lit"]["mfu"] / metrics["clip"]["mfu"],
                             counts["lit"]["xla"] / counts["clip"]["xla"], rtol=1e-12)
  assert metrics["lit"]["mfu"] < 0.85 * metrics["clip"]["mfu"]


def test_frozen_keyword_defaults_and_errors():
  """The plain micro LiT config: frozen=None and '' count everything as trainable; freezing is cheaper; a regex
  that matches no parameter is a user error."""
  _, model, loss_fn, batch = _setup("configs/pretrain/lit.py", width=None)
  everything = flops.xla_model_flops_per_step(model, loss_fn, batch)
  assert flops.xla_model_flops_per_step(model, loss_fn, batch, frozen="") == everything
  assert flops.xla_model_flops_per_step(model, loss_fn, batch, frozen=r"^img/") < everything
  with pytest.raises(UserError, match="matches no parameter"):
    flops.xla_model_flops_per_step(model, loss_fn, batch, frozen=r"^vision/")


def test_costing_model_unscans_and_drops_remat():
  config = th.load_config("configs/pretrain/clip.py", "img=B/16,txt=B,res=224")
  assert config.model.scan and config.model.remat != "none"
  model = flops.costing_model(build_model(config.model))
  for tower in (model.img, model.txt):
    assert tower.scan is False and tower.remat == "none"
