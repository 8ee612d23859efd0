"""Performance knobs that change no result: the attention kernel, the platform dtype, step traces, closing the data
workers. Kernels are compared against a reference einsum attention on CPU; cuDNN itself needs an NVIDIA GPU
(benchmarks/accelerator.py exercises it there)."""

from __future__ import annotations

import glob
import json
import logging
import os
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import train_helpers as th
from vlm_jax import assembly, models
from vlm_jax.errors import UserError
from vlm_jax.models import transformer
from vlm_jax.train import loop, profiling


def _reference_attention(q, k, v, mask):
  """softmax(q kᵀ / √d) v written out with einsum (float32), the textbook definition."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = jnp.where(mask, logits, -1e30)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def _qkv(seed=0, b=2, length=7, heads=2, d=8):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return [jax.random.normal(key, (b, length, heads, d), jnp.float32) for key in ks]


@pytest.mark.parametrize("causal", [False, True])
def test_xla_attention_equals_the_einsum_reference_in_value_and_gradient(causal):
  q, k, v = _qkv()
  pad = jnp.array([[True] * 7, [True] * 5 + [False] * 2])[:, None, None, :]  # a key-padding mask as well
  full = jnp.logical_and(pad, transformer.causal_mask(7)) if causal else pad

  def ours(q, k, v):
    return transformer.attend(q, k, v, pad, causal=causal, implementation="xla")

  def ref(q, k, v):
    return _reference_attention(q, k, v, full)

  np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-6)
  g_ours = jax.grad(lambda *a: jnp.sum(ours(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
  g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_cudnn_falls_back_to_xla_with_one_warning_where_the_kernel_cannot_run(caplog):
  q, k, v = _qkv()
  transformer._warned.clear()  # noqa: SLF001 (the once-per-reason memory)
  assert "float32" in transformer.cudnn_unsupported(q, None)
  assert "head size" in transformer.cudnn_unsupported(jnp.zeros((1, 4, 2, 12), jnp.bfloat16), None)
  assert "mask" in transformer.cudnn_unsupported(jnp.zeros((1, 4, 2, 16), jnp.bfloat16), jnp.ones((1, 1, 4, 4), bool))
  assert transformer.cudnn_unsupported(jnp.zeros((1, 4, 2, 64), jnp.bfloat16), None) is None
  with caplog.at_level(logging.WARNING, logger="vlm_jax"):
    for _ in range(3):
      got = transformer.attend(q, k, v, causal=True, implementation="cudnn")
  np.testing.assert_array_equal(got, transformer.attend(q, k, v, causal=True, implementation="xla"))
  warnings = [r for r in caplog.records if "cuDNN attention cannot run" in r.getMessage()]
  assert len(warnings) == 1


def test_attention_choice_per_platform():
  assert jax.default_backend() == "cpu"
  assert transformer.attention_implementation("auto", jnp.bfloat16) == "xla"  # not an NVIDIA GPU
  assert transformer.attention_implementation("xla", jnp.bfloat16) == "xla"
  with pytest.raises(UserError, match="needs an NVIDIA GPU"):
    transformer.attention_implementation("cudnn", jnp.bfloat16)
  with pytest.raises(UserError, match="unknown model.attention"):
    transformer.attention_implementation("flash", jnp.float32)
  assert models.dtype_of("auto") == jnp.float32  # CPU: float32 compute


def test_a_causal_encoder_handing_causality_to_the_kernel_equals_the_masked_one():
  """attention='cudnn' passes `causal` down to the kernel instead of building the mask; where the kernel cannot
  run (float32 here) the fallback rebuilds the same mask, so the text tower's output is bit-identical."""
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 16))
  enc = transformer.Encoder(depth=2, num_heads=2, mlp_dim=32, causal=True)
  variables = enc.init(jax.random.PRNGKey(0), x)
  kernel = transformer.Encoder(depth=2, num_heads=2, mlp_dim=32, causal=True, attention="cudnn")
  np.testing.assert_array_equal(enc.apply(variables, x), kernel.apply(variables, x))


def test_auto_dtype_and_attention_build_the_same_cpu_model():
  config = th.micro_config()
  auto = th.micro_config(**{"model.dtype": "auto", "model.attention": "auto"})
  _, model, _ = assembly.assemble(config)[:3]
  _, model_auto, _ = assembly.assemble(auto)[:3]
  assert model_auto.img.dtype == jnp.float32 and model_auto.txt.attention == "xla"
  assert model_auto.img.attention == model.img.attention == "xla"


def test_profile_steps_write_a_trace_on_cpu(tmp_path, capsys):
  wd = str(tmp_path / "run")
  from vlm_jax import runner  # noqa: PLC0415
  runner.pretrain(th.micro_config(total_steps=4, profile_steps="2,3"), wd)
  traces = glob.glob(os.path.join(wd, "profile", "plugins", "profile", "*", "*.xplane.pb"))
  assert traces and os.path.getsize(traces[0]) > 0
  assert f"profile: steps 2-3 traced to {os.path.join(wd, 'profile')}" in capsys.readouterr().out


@pytest.mark.parametrize("spec", ["3", "0,2", "5,4", "a,b"])
def test_bad_profile_steps_are_one_user_error(spec):
  with pytest.raises(UserError, match="profile_steps"):
    profiling.parse(spec)
  assert profiling.parse("") is None and profiling.parse("2,2") == (2, 2)


@pytest.mark.parametrize("fail", [False, True])
def test_the_loop_closes_the_data_iterator_when_it_ends_or_fails(tmp_path, fail):
  """grain's worker processes stop when the run ends (or a data error ends it), not in a finaliser that races the
  interpreter's exit."""
  config = th.micro_config(total_steps=3)
  tokenizer, model, loss_fn = assembly.assemble(config)[:3]
  from vlm_jax.data import pipeline  # noqa: PLC0415
  closed = []

  class Watched(grain.DatasetIterator):
    def __init__(self, it):
      super().__init__(it)
      self.n = 0

    def __next__(self):
      self.n += 1
      if fail and self.n == 2:
        raise UserError("shard went away")
      return next(self._parent)

    def get_state(self):
      return self._parent.get_state()

    def set_state(self, state):
      self._parent.set_state(state)

    def close(self):
      closed.append(self.n)
      super().close()

  kept = []  # a reference held here: no garbage collection can be what closes it

  def make_data(pi, pc):
    kept.append(Watched(pipeline.make_train_iterator(config.data, global_batch_size=config.batch_size,
                                                     seed=config.seed, tokenizer=tokenizer, process_index=pi,
                                                     process_count=pc)))
    return kept[-1]

  wd = str(tmp_path / "run")
  if fail:
    with pytest.raises(UserError, match="shard went away"):
      loop.train(config, wd, make_data=make_data, model=model, loss_fn=loss_fn, quiet=True)
    assert closed == [2]
  else:
    loop.train(config, wd, make_data=make_data, model=model, loss_fn=loss_fn, quiet=True)
    assert closed == [3]


def test_accelerator_benchmark_quick_runs_on_cpu():
  """`benchmarks/accelerator.py --quick` (what a user runs first on a new machine) prints one JSON line per
  measurement and a summary naming the device; no timing is asserted."""
  proc = th.run_cli([sys.executable, "benchmarks/accelerator.py", "--quick"], devices=1, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
  parts = {ln.get("part") for ln in lines}
  assert {"step", "loss", "data"} <= parts
  summary = lines[-1]
  assert summary["summary"] and summary["platform"] == "cpu"
  assert summary["micro/images_per_sec"] > 0 and 0 < summary["micro/best_mfu"]
  assert summary["loss/ring_largest_batch"] >= summary["loss/dense_largest_batch"] > 0
  assert summary["data/images_per_cpu_second"] > 0


def test_cpu_step_profile_names_the_model_code_of_each_operation():
  """`benchmarks/cpu_step_profile.py` on the micro step: per-class totals whose shares sum to 1, and operations
  named by the model code they came from (the trace's events matched to the HLO metadata); no timing asserted."""
  proc = th.run_cli([sys.executable, "benchmarks/cpu_step_profile.py", "--config=configs/pretrain/clip.py:micro",
                     "--steps=2", "--top=5", "--no-open-clip"], devices=1, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
  classes = [ln for ln in lines if "class" in ln]
  ops = [ln for ln in lines if "op" in ln]
  assert classes and abs(sum(c["share"] for c in classes) - 1) < 0.01
  assert len(ops) == 5 and all(op["source"] for op in ops)
  assert any("img/" in op["source"] or "txt/" in op["source"] for op in ops)
  assert [ln["system"] for ln in lines if "step_ms" in ln] == ["vlm_jax"]
