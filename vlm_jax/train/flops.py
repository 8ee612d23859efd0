"""Model FLOPs, peak FLOP/s and model FLOPs utilisation (MFU) of a training step.

Model FLOPs are the FLOPs of the model's mathematics, not of the hardware: rematerialisation does not count (PaLM,
Chowdhery et al. 2022, App. B). Per training sample they are 3× the forward FLOPs (the backward pass costs twice
the forward). Two independent counts:

  XLA:       forward FLOPs from `cost_analysis()` of the lowered forward + loss (any framework, remat-free
             since the forward pass never recomputes), ×3.
  analytic:  per transformer tower of width w, depth d, MLP width m and sequence length T
               forward = 2·T·d·(4w² + 2wm)   (matmuls: 2 FLOPs per parameter per token)
                       + 4·T²·w·d          (attention scores QKᵀ and the weighted sum AV)
             plus the ViT patch embedding 2·T·(p²·3)·w and the projections 2·w·E; ×3 for training
             (Kaplan et al. 2020; Narayanan et al. 2021).

MFU = model FLOPs per second / (devices × peak FLOP/s per device). The peak is the vendor's dense bf16 figure
(`PEAK_TFLOPS`); on CPU it is measured by a large float32 matmul at start-up, divided by the number of local
devices (XLA's simulated CPU devices share the machine's cores).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def unscanned(module: nn.Module) -> nn.Module:
  """`module` with `scan=False` wherever it (or an encoder it holds) scans its layers: XLA's cost analysis counts
  a loop body once, not once per iteration."""
  kw = {}
  for f in dataclasses.fields(module):
    value = getattr(module, f.name, None)
    if f.name not in ("parent", "name") and isinstance(value, nn.Module):
      inner = unscanned(value)
      if inner is not value:
        kw[f.name] = inner
  if getattr(module, "scan", False) is True:
    kw["scan"] = False
  return module.clone(**kw) if kw else module


def xla_model_flops_per_step(model, loss_fn: Callable, batch: Mapping[str, Any]) -> float:
  """3 × the XLA-counted FLOPs of one training forward pass (model + objectives) over the global `batch`.

  `batch` holds arrays or `jax.ShapeDtypeStruct`s; the model is costed unscanned with abstract parameters, so
  nothing is compiled, allocated or run. Call inside the mesh context when the objectives need one.
  """
  model = unscanned(model)
  rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1), "mask": jax.random.PRNGKey(2)}

  def forward(variables, batch):
    return loss_fn(model.apply(variables, batch, train=True, rngs=rngs), batch)[0]

  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in dict(batch).items()}
  variables = jax.eval_shape(lambda b: model.init(rngs, b, train=True), batch)
  return 3.0 * lowered_flops(jax.jit(forward).lower(variables, batch))


def transformer_forward_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> float:
  """Forward FLOPs of `depth` pre-LN transformer blocks over one sequence of `tokens` (see the module docstring)."""
  return 2.0 * tokens * depth * (4 * width * width + 2 * width * mlp_dim) + 4.0 * tokens ** 2 * width * depth


def analytic_train_flops_per_sample(model, image_shape, text_len: int) -> float | None:
  """3 × forward FLOPs of a two-tower model with a ViT image tower and a transformer text tower; None otherwise.

  `model` is the built module (`vlm_jax.models.build_model`), `image_shape` (H, W, C) and `text_len` the inputs.
  """
  img, txt = getattr(model, "img", None), getattr(model, "txt", None)
  if img is None or txt is None or not hasattr(img, "grid_size") or not hasattr(txt, "vocab_size"):
    return None
  gh, gw = img.grid_size(image_shape[:2])
  patch = img.patch_size if isinstance(img.patch_size, int) else img.patch_size[0]
  tokens = gh * gw + (1 if img.pool_type == "cls" else 0)
  embed = getattr(model, "embed_dim", 0)
  fwd = transformer_forward_flops(tokens, img.width, img.depth, img.mlp_dim)
  fwd += 2.0 * gh * gw * patch * patch * image_shape[2] * img.width
  fwd += transformer_forward_flops(text_len, txt.width, txt.depth, txt.mlp_dim)
  fwd += 2.0 * (img.width + txt.width) * embed
  return 3.0 * fwd


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
