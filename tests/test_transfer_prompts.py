"""Transfer part 1 (issue 13): CoOp, CoCoOp, KgCoOp, ProGrad and the transfer entry point.

Exactness tests use a randomly initialised micro CLIP (no training needed); the run-level tests use the same
micro model saved as a run directory (seconds per run); the behaviour test uses the cached pretrained fixture.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from tests import train_helpers as th
from tests.faults import kill
from vlm_jax import assembly, runs
from vlm_jax.transfer import datasets, run as run_lib
from vlm_jax.transfer.methods import build_method, prograd
from vlm_jax.transfer.methods import prompting as pr

NAMES = ["red circle", "blue square", "green triangle", "yellow star"]


@pytest.fixture(scope="module")
def micro():
  """(config, tokenizer, model, variables) of a random micro CLIP (ViT 16 px, words tokenizer)."""
  c = th.load_config("configs/pretrain/clip.py", "micro")
  tok, model = assembly.build(c)
  v = model.init(jax.random.PRNGKey(0), assembly.example_batch(c, model, 2), train=False)
  from vlm_jax.parallel import partitioning  # noqa: PLC0415
  return c, tok, model, jax.device_get(dict(partitioning.unbox(v)))


@pytest.fixture(scope="module")
def micro_dir(micro, tmp_path_factory):
  c, _, _, v = micro
  return runs.save_model(str(tmp_path_factory.mktemp("base") / "micro"), c, v)


def _method(micro, name, **cfg):
  c, tok, model, v = micro
  m = build_method(name, ml_collections.ConfigDict(cfg), base_model=model, base_config=c, tokenizer=tok,
                   class_names=NAMES, templates=("a photo of a {}.",))
  images = jax.random.normal(jax.random.PRNGKey(1), (3, 16, 16, 3))
  init = m.module.init(jax.random.PRNGKey(2), {"image": images, "label": jnp.zeros(3, jnp.int32)})
  params = {**jax.device_get(init["params"]), "base": v["params"]}
  return m, {"params": params}, images


def test_coop_with_phrase_context_equals_zeroshot_template(micro):
  _, tok, model, v = micro
  m, variables, images = _method(micro, "coop", n_ctx=0, init="a photo of a")
  got = m.logits_fn(m.module, variables, images)
  ids = jnp.asarray(tok([f"a photo of a {n}." for n in NAMES]))
  want = model.apply(v, images, method="encode_image") @ model.apply(v, ids, method="encode_text").T
  want = want * model.apply(v, method="logit_scale")
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  for position in ("middle", "front"):  # the other class-token positions splice M slots per class
    pt = pr.make_prompt_text(tok, NAMES, 4, position)
    assert (np.asarray(pt.ctx_index) >= 0).sum(1).tolist() == [4] * len(NAMES)


def test_cocoop_with_zero_meta_output_equals_coop(micro):
  coop, cv, images = _method(micro, "coop", n_ctx=0, init="a photo of a")
  for chunk in (0, 3):  # all classes at once, and a scan over 2 chunks with padding
    co, v, _ = _method(micro, "cocoop", n_ctx=0, init="a photo of a", class_chunk=chunk)
    p = dict(v["params"])
    p["meta_linear2"] = jax.tree.map(jnp.zeros_like, p["meta_linear2"])
    p["ctx"] = cv["params"]["ctx"] + 0.1  # any context: both must agree
    cv2 = {"params": {**cv["params"], "ctx": p["ctx"]}}
    np.testing.assert_allclose(co.logits_fn(co.module, {"params": p}, images),
                               coop.logits_fn(coop.module, cv2, images), atol=1e-5, rtol=1e-5)
    # with a non-zero meta-net the chunked and unchunked forms agree with each other
    if chunk:
      full, _, _ = _method(micro, "cocoop", n_ctx=0, init="a photo of a", class_chunk=0)
      v["params"]["ctx"] = p["ctx"]
      np.testing.assert_allclose(co.logits_fn(co.module, v, images), full.logits_fn(full.module, v, images),
                                 atol=1e-5, rtol=1e-5)


def test_kgcoop_weight_zero_equals_coop(micro):
  coop, v, images = _method(micro, "coop", n_ctx=8)
  kg, _, _ = _method(micro, "kgcoop", n_ctx=8, weight=0.0)
  batch = {"image": images, "label": jnp.asarray([0, 1, 3])}

  def loss(method, params):
    out = method.module.apply({"params": params}, batch, train=True)
    return method.loss_fn(out, batch)[0]

  np.testing.assert_allclose(loss(kg, v["params"]), loss(coop, v["params"]), rtol=1e-6)
  gk, gc = (jax.grad(lambda p, m=m: loss(m, p))(v["params"])["ctx"] for m in (kg, coop))
  np.testing.assert_allclose(gk, gc, rtol=1e-5, atol=1e-7)
  kg8, _, _ = _method(micro, "kgcoop", n_ctx=8, weight=8.0)
  assert float(loss(kg8, v["params"])) > float(loss(coop, v["params"]))  # the knowledge term is active


def test_prograd_update_never_opposes_the_kl_gradient(micro):
  m, v, images = _method(micro, "prograd", n_ctx=4)
  coop, _, _ = _method(micro, "coop", n_ctx=4)  # the same context without the split: the true gradients
  params = dict(v["params"])
  conflicts = 0
  for seed in range(6):
    params["ctx"] = 0.3 * jax.random.normal(jax.random.PRNGKey(seed), params["ctx"].shape)
    batch = {"image": images, "label": jax.random.randint(jax.random.PRNGKey(10 + seed), (3,), 0, 4)}
    zs = m.module.apply({"params": params}, batch, train=True)["logits_zs"]

    def parts(p):
      logits = coop.module.apply({"params": p}, batch, train=True)["logits"]
      return pr.ce_loss({"logits": logits}, batch)[0], prograd.kl_to_zeroshot({"logits_kl": logits,
                                                                                "logits_zs": zs})

    g = jax.grad(lambda p: m.loss_fn(m.module.apply({"params": p}, batch, train=True), batch)[0])(params)["ctx"]
    g_ce = jax.grad(lambda p: parts(p)[0])(params)["ctx"]
    g_kl = jax.grad(lambda p: parts(p)[1])(params)["ctx"]
    scale = float(jnp.linalg.norm(g_ce) * jnp.linalg.norm(g_kl))
    assert float(jnp.vdot(g, g_kl)) >= -1e-5 * scale
    np.testing.assert_allclose(g, prograd.project(g_ce, g_kl), rtol=1e-4, atol=1e-6)
    if float(jnp.vdot(g_ce, g_kl)) < 0:
      conflicts += 1
      assert abs(float(jnp.vdot(g, g_kl))) <= 1e-4 * scale  # the conflicting component is removed
    else:
      np.testing.assert_allclose(g, g_ce, rtol=1e-4, atol=1e-6)  # no conflict: the CE gradient unchanged
  np.testing.assert_allclose(prograd.project(jnp.array([1.0, -1.0]), jnp.array([0.0, 1.0])), [1.0, 0.0])
  print("draws with conflicting CE / KL gradients:", conflicts, "of 6")


def _config(method: str, base: str, **kw):
  c = th.load_config(f"configs/transfer/{method}.py", "tiny")
  c.init.checkpoint = base
  c.dataset, c.shots, c.epochs, c.test_per_class, c.batch_size = "shifted_hues", 1, 2, 2, 16
  c.log_every_steps, c.checkpoint_every_steps = 1, 2
  for k, v in kw.items():
    c[k] = v
  return c


def test_frozen_base_is_untouched_and_not_checkpointed_and_test_read_last(micro, micro_dir, tmp_path,
                                                                         monkeypatch):
  events = []
  load, train = datasets.Dataset.load, run_lib.loop.train
  monkeypatch.setattr(datasets.Dataset, "load",
                      lambda self, split, **kw: (events.append(split), load(self, split, **kw))[1])
  monkeypatch.setattr(run_lib.loop, "train",
                      lambda *a, **kw: (events.append("train"), train(*a, **kw), events.append("trained"))[1])
  wd = str(tmp_path / "coop")
  r = run_lib.transfer(_config("coop", micro_dir, protocol="base_to_novel"), wd, quiet=True)
  assert events[-1] == "test" and "test" not in events[:-1] and events.index("trained") < len(events) - 1, events
  assert {"base/top1", "novel/top1", "harmonic_mean", "zeroshot/top1", "top1"} <= set(r)
  # the checkpoint holds the context only; the base comes back bit-identical, by reference
  step_dir = os.path.join(wd, "checkpoints", str(max(runs.steps(os.path.join(wd, "checkpoints")))), "state")
  with open(os.path.join(step_dir, "_METADATA")) as f:
    meta = f.read()
  assert "ctx" in meta and "txt_proj" not in meta and "token_embedding" not in meta
  loaded = runs.load(wd).variables
  want = traverse_util.flatten_dict(micro[3]["params"], sep="/")
  got = traverse_util.flatten_dict(loaded["params"]["base"], sep="/")
  assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
  with open(os.path.join(wd, "frozen_reference.json")) as f:
    assert json.load(f)["sources"][0]["checkpoint"] == os.path.abspath(micro_dir)


def test_missing_base_is_one_line_exit_2(tmp_path, capsys):
  from vlm_jax.transfer.__main__ import run
  with pytest.raises(SystemExit) as e:
    run(["prog", "--config=configs/transfer/coop.py:tiny", f"--workdir={tmp_path}",
         f"--config.init.checkpoint={tmp_path / 'nowhere'}"])
  err = capsys.readouterr().err.strip().splitlines()
  errors = [ln for ln in err if ln.startswith("error: ")]  # (other lines: library warnings of the test process)
  assert e.value.code == 2 and len(errors) == 1 and err[-1] == errors[0] and "make demo" in errors[0], err


def _rows(wd):
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    rows = [json.loads(ln) for ln in f if ln.strip()]
  return [{k: v for k, v in r.items() if k not in ("images_per_sec", "tflops_per_device", "mfu")} for r in rows]


def test_kill_9_resume_continues_identically(micro_dir, tmp_path):
  flags = [f"--config.init.checkpoint={micro_dir}", "--config.shots=2", "--config.epochs=4",
           "--config.test_per_class=2", "--config.batch_size=16", "--config.log_every_steps=1",
           "--config.checkpoint_every_steps=2", "--config.n_ctx=4" if False else "--config.method.n_ctx=4"]
  cmd = lambda wd: [sys.executable, "-m", "vlm_jax.transfer", "--config=configs/transfer/coop.py:tiny",  # noqa
                    f"--workdir={wd}", *flags]
  ref, wd = str(tmp_path / "ref"), str(tmp_path / "run")
  r = subprocess.run(cmd(ref), cwd=th.ROOT, env=th.env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  total = json.loads(r.stdout.strip().splitlines()[-1])["steps"]
  proc = kill.start(cmd(wd))
  assert kill.kill_when(proc, kill.checkpoint_reached(os.path.join(wd, "checkpoints"), 2)), \
      "the run finished before it could be killed"
  r2 = subprocess.run(cmd(wd), cwd=th.ROOT, env=th.env(), capture_output=True, text=True, timeout=600)
  assert r2.returncode == 0, r2.stderr[-2000:]
  assert "resumed from" in r2.stdout
  assert _rows(wd) == _rows(ref)
  got, want = (json.loads(x.stdout.strip().splitlines()[-1]) for x in (r2, r))
  assert got == want and got["steps"] == total
