"""Model FLOPs, peak FLOP/s and model FLOPs utilisation (MFU) of a training step.

Model FLOPs are the FLOPs of the model's mathematics, not of the hardware: rematerialisation does not count (PaLM,
Chowdhery et al. 2022, App. B). A training step runs the forward once and the backward only where a gradient is
needed: a trainable part costs its forward F plus a backward of about 2F (activation and weight gradients), 3F in
all; a frozen part upstream of everything trainable (a locked LiT image tower, an MAE feature teacher) is never
differentiated and costs F. With `frozen` (the config's regex over '/'-joined parameter paths, as
`vlm_jax.train.optim.split_frozen` uses) both counts below follow that rule; without it every parameter trains.

  XLA:       `cost_analysis()` of the lowered `value_and_grad` of model + objectives with respect to the trainable
             parameters only (frozen parameters and other variable collections are constants), so XLA counts the
             forward once and exactly the backward that training needs (a frozen part downstream of trainable
             ones gets its activation gradients, ≈ 2F, and no weight gradients). The model is costed unscanned
             (XLA counts a loop body once, not per iteration) and without remat (recomputation is not model
             FLOPs). Loops inside the objectives (the ring losses' tiles) are counted once per body; they are a
             small part of a step.
  analytic:  per transformer tower of width w, depth d, MLP width m and sequence length T
               forward = 2·T·d·(4w² + 2wm)   (matmuls: 2 FLOPs per parameter per token)
                       + 4·T²·w·d          (attention scores QKᵀ and the weighted sum AV)
             plus the ViT patch embedding 2·T·(p²·3)·w and the projections 2·w·E (Kaplan et al. 2020; Narayanan
             et al. 2021); training = Σ_parts forward_part × (1 if the part is frozen else 3), a part (image
             tower, text tower, each projection) being frozen when `frozen` matches all its parameters.

MFU = model FLOPs per second / (devices × peak FLOP/s per device). The peak is the vendor's dense bf16 figure
(`PEAK_TFLOPS`); on CPU it is measured by a large float32 matmul at start-up, divided by the number of local
devices (XLA's simulated CPU devices share the machine's cores).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import statistics
import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from vlm_jax.train import optim

# dense bf16 peak TFLOP/s per chip / GPU (vendor data sheets); matched against `device.device_kind`
PEAK_TFLOPS: dict[str, float] = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,  # v5e
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,  # v6e (Trillium)
    "TPU v6e": 918.0,
    "A100": 312.0,
    "H100": 989.0,        # SXM
    "H200": 989.0,
}


def _cost_flops(cost: Any) -> float:
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def lowered_flops(lowered) -> float:
  """Global FLOPs of a lowered (not yet compiled) computation, as XLA's HLO cost analysis counts them."""
  return _cost_flops(lowered.cost_analysis())


def costing_model(module: nn.Module) -> nn.Module:
  """`module` with `scan=False` and no remat wherever it (or a module it holds) has those fields: XLA's cost
  analysis counts a loop body once, not once per iteration, and recomputation is not model FLOPs."""
  kw = {}
  for f in dataclasses.fields(module):
    value = getattr(module, f.name, None)
    if f.name not in ("parent", "name") and isinstance(value, nn.Module):
      inner = costing_model(value)
      if inner is not value:
        kw[f.name] = inner
  if getattr(module, "scan", False) is True:
    kw["scan"] = False
  remat = getattr(module, "remat", None)
  if isinstance(remat, bool) and remat:
    kw["remat"] = False
  elif isinstance(remat, str) and remat != "none":
    kw["remat"] = "none"
  return module.clone(**kw) if kw else module


def xla_model_flops_per_step(model, loss_fn: Callable, batch: Mapping[str, Any], *,
                             frozen: str | None = None) -> float:
  """XLA-counted FLOPs of one training step (model + objectives, forward and the backward it needs) over the
  global `batch`; `frozen`: the config's regex of frozen parameter paths (None or '': everything trains).

  `batch` holds arrays or `jax.ShapeDtypeStruct`s; the model is costed unscanned and without remat, with abstract
  variables, so nothing is compiled, allocated or run. Variable collections other than 'params' (e.g. BatchNorm
  statistics) are constants, updated in place as in training. Call inside the mesh context when the objectives
  need one. A `frozen` regex that matches no parameter, or all of them, raises `UserError` (`split_frozen`).
  """
  model = costing_model(model)
  rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1), "mask": jax.random.PRNGKey(2)}
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in dict(batch).items()}
  variables = nn.meta.unbox(jax.eval_shape(lambda b: model.init(rngs, b, train=True), batch))
  others = {k: v for k, v in variables.items() if k != "params"}
  trainable, fixed = optim.split_frozen(variables["params"], frozen or None)

  def loss(trainable, fixed, others, batch):
    variables = {"params": optim.merge_params(trainable, fixed), **others}
    if others:
      outputs, _ = model.apply(variables, batch, train=True, rngs=rngs, mutable=list(others))
    else:
      outputs = model.apply(variables, batch, train=True, rngs=rngs)
    return loss_fn(outputs, batch)[0]

  return lowered_flops(jax.jit(jax.value_and_grad(loss)).lower(trainable, fixed, others, batch))


def transformer_forward_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> float:
  """Forward FLOPs of `depth` pre-LN transformer blocks over one sequence of `tokens` (see the module docstring)."""
  return 2.0 * tokens * depth * (4 * width * width + 2 * width * mlp_dim) + 4.0 * tokens ** 2 * width * depth


def _frozen_parts(model, image_shape, text_len: int, frozen: str | None, parts) -> set[str]:
  """The top-level parameter groups of `parts` whose every parameter path matches `frozen`."""
  if not frozen:
    return set()
  batch = {"image": jax.ShapeDtypeStruct((1, *image_shape), jnp.float32),
           "text": jax.ShapeDtypeStruct((1, text_len), jnp.int32)}
  params = jax.eval_shape(lambda b: model.init(jax.random.PRNGKey(0), b), batch)["params"]
  flat = traverse_util.flatten_dict(nn.meta.unbox(params), sep="/")
  rx = re.compile(frozen)
  return {part for part in parts
          if any(k.startswith(part + "/") for k in flat)
          and all(rx.search(k) for k in flat if k.startswith(part + "/"))}


def analytic_train_flops_per_sample(model, image_shape, text_len: int, *, frozen: str | None = None
                                    ) -> float | None:
  """Training FLOPs per sample of a two-tower model with a ViT image tower and a transformer text tower (None
  for other models): Σ over the image tower, the text tower and the two projections of forward × 3, or × 1 for
  a part whose parameters `frozen` (the config's regex) all match (module docstring).

  `model` is the built module (`vlm_jax.models.build_model`), `image_shape` (H, W, C) and `text_len` the inputs.
  """
  img, txt = getattr(model, "img", None), getattr(model, "txt", None)
  if img is None or txt is None or not hasattr(img, "grid_size") or not hasattr(txt, "vocab_size"):
    return None
  gh, gw = img.grid_size(image_shape[:2])
  patch = img.patch_size if isinstance(img.patch_size, int) else img.patch_size[0]
  tokens = gh * gw + (1 if img.pool_type == "cls" else 0)
  embed = getattr(model, "embed_dim", 0)
  forward = {
      "img": transformer_forward_flops(tokens, img.width, img.depth, img.mlp_dim)
             + 2.0 * gh * gw * patch * patch * image_shape[2] * img.width,
      "txt": transformer_forward_flops(text_len, txt.width, txt.depth, txt.mlp_dim),
      "img_proj": 2.0 * img.width * embed,
      "txt_proj": 2.0 * txt.width * embed,
  }
  frozen_parts = _frozen_parts(model, image_shape, text_len, frozen, forward)
  return sum(f * (1.0 if part in frozen_parts else 3.0) for part, f in forward.items())


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(n: int = 1536, repeats: int = 5) -> float:
  """FLOP/s of an n×n float32 matmul on this process's first device (median of `repeats`, after one
  warm-up); call it outside a `jax.set_mesh` context."""
  dev = jax.local_devices()[0]
  a = jax.device_put(jnp.ones((n, n), jnp.float32), dev)
  mm = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(mm(a, a))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(mm(a, a))
    times.append(time.perf_counter() - t)
  return 2.0 * n ** 3 / statistics.median(times)


def peak_flops_per_device(device=None) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the number comes from): the `PEAK_TFLOPS` row matching the device kind,
  or on CPU the measured matmul rate shared by the local devices."""
  device = device or jax.local_devices()[0]
  kind = str(getattr(device, "device_kind", ""))
  for name in sorted(PEAK_TFLOPS, key=len, reverse=True):  # 'TPU v5 lite' before 'TPU v5'
    if name.lower() in kind.lower():
      return PEAK_TFLOPS[name] * 1e12, f"table:{name}"
  if device.platform == "cpu":
    return measured_matmul_flops() / max(1, jax.local_device_count()), "measured:cpu_matmul_f32"
  return 0.0, f"unknown:{kind}"


def throughput_metrics(images: int, seconds: float, model_flops_per_step: float, steps: int, devices: int,
                       peak_per_device: float) -> dict[str, float]:
  """{'images_per_sec', 'tflops_per_device', 'mfu'} of `steps` steps over `seconds` (mfu 0 when no peak)."""
  if seconds <= 0:
    return {"images_per_sec": 0.0, "tflops_per_device": 0.0, "mfu": 0.0}
  per_device = model_flops_per_step * steps / seconds / max(1, devices)
  return {"images_per_sec": images / seconds, "tflops_per_device": per_device / 1e12,
          "mfu": per_device / peak_per_device if peak_per_device > 0 else 0.0}
