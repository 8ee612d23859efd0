"""The large variants (B/16, L/14, So400m/14) lower and compile on an 8-device FSDP mesh, and their model FLOPs
counted by XLA agree with the analytic 2·params·tokens + attention formula."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tests import train_helpers as th
from vlm_jax import assembly
from vlm_jax.models import build_model
from vlm_jax.parallel import partitioning
from vlm_jax.parallel.mesh import make_mesh
from vlm_jax.train import aot, flops

LARGE = [("clip", "img=B/16,txt=B,res=224"), ("clip", "img=L/14,txt=L,res=224,embed=768"),
         ("siglip", "img=So400m/14,txt=So400m,res=224")]


@pytest.mark.parametrize("name,arg", LARGE, ids=["B/16", "L/14", "So400m/14"])
def test_large_variant_compiles_on_fsdp_mesh(name, arg):
  config = th.load_config(f"configs/pretrain/{name}.py", arg)
  mesh = make_mesh({"fsdp": 8})
  out = aot.compile_train_step(config, mesh, partitioning.rules_from_config(None), batch_size=8)
  mem = out.compiled.memory_analysis()
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      jax.eval_shape(lambda: build_model(config.model).init(
          jax.random.PRNGKey(0), {k: np.zeros((1, *v.shape[1:]), v.dtype) for k, v in out.batch.items()}))))
  # FSDP: parameters (fp32) and the two Adam moments, each about 1/8 per device; arguments include the batch
  per_device_state = mem.argument_size_in_bytes
  print(f"{arg}: {params / 1e6:.0f}M params, arguments {per_device_state / 2**20:.0f} MiB/device, "
        f"temp {mem.temp_size_in_bytes / 2**20:.0f} MiB/device, compiled in {out.compile_s:.1f} s")
  assert per_device_state < 3 * 4 * params / 8 * 1.1 + 8 * 224 * 224 * 3 * 4
  assert per_device_state > 3 * 4 * params / 8 * 0.9


@pytest.mark.parametrize("name,arg", LARGE[:2], ids=["B/16", "L/14"])
def test_xla_and_analytic_model_flops_agree(name, arg):
  config = th.load_config(f"configs/pretrain/{name}.py", arg)
  model, loss_fn = build_model(config.model), assembly.build_loss_fn(config)  # full configs fix vocab and length
  mesh = make_mesh({"data": 8})
  batch = aot.abstract_batch(config, 8, mesh)
  with jax.set_mesh(mesh):
    xla = flops.xla_model_flops_per_step(model, loss_fn, batch) / 8
  res = config.data.image_size
  analytic = flops.analytic_train_flops_per_sample(model, (res, res, 3), config.model.text.max_len)
  print(f"{arg}: train GFLOPs/sample XLA {xla / 1e9:.1f}, analytic {analytic / 1e9:.1f}, ratio {xla / analytic:.3f}")
  assert abs(xla / analytic - 1) < 0.10


def test_aot_compiles_the_loops_step_with_its_options():
  """The compile-only path builds the step the loop runs: gradient accumulation and the loss-spike guard's
  state included (a memory check of another step would mislead)."""
  config = assembly.complete(th.micro_config(loss_spike_factor=4.0, loss_spike_window=8))
  config.optimizer.grad_accum_steps = 2
  mesh = make_mesh({"data": 8})
  out = aot.compile_train_step(config, mesh, partitioning.rules_from_config(None), batch_size=16)
  state_info = out.lowered.args_info[0][0]
  assert state_info.loss_guard["recent"].shape == (8,)
  hlo = out.lowered.as_text()
  assert "while" in hlo  # the micro-batch loop of gradient accumulation (absent at grad_accum_steps=1)
