"""Full fine-tuning, LP-FT and WiSE-FT through the transfer entry point (issue 14).

Exactness uses a randomly initialised micro CLIP whose ViT open_clip can represent (cls pooling, pre-norm, no patch
bias): fine-tuning at its zero-shot head and WiSE-FT at α = 0 equal zero-shot CLIP, WiSE-FT at α = 1 is the
fine-tuned model bit for bit, LP-FT's head at step 0 is the linear probe. A short WiSE-FT run of that micro model
checks that the run directory is a full model: `inference.load`, the evaluate CLI's reader and (interop extra)
`convert --to open_clip` give the run's own logits. The behaviour test fine-tunes the pretrained ViT fixture on
the default shift task and reports the WiSE-FT curve on the shifted task.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from tests import train_helpers as th
from vlm_jax import assembly, inference, runs
from vlm_jax.transfer import datasets, run as run_lib
from vlm_jax.transfer.methods import build_method, finetune, lp_ft, wise_ft

NAMES = ["red circle", "blue square", "green triangle", "yellow star"]
OPEN_CLIP_VIT = {"pool_type": "cls", "pre_norm": True, "patch_bias": False}


@pytest.fixture(scope="module")
def micro():
  """(config, tokenizer, model, variables) of a random micro CLIP (ViT 16 px in open_clip's layout)."""
  from vlm_jax.parallel import partitioning  # noqa: PLC0415
  c = th.load_config("configs/pretrain/clip.py", "micro")
  c.model.image.update(OPEN_CLIP_VIT)
  tok, model = assembly.build(c)
  v = model.init(jax.random.PRNGKey(0), assembly.example_batch(c, model, 2), train=False)
  return c, tok, model, jax.device_get(dict(partitioning.unbox(v)))


def _build(micro, name, **cfg):
  c, tok, model, _ = micro
  return build_method(name, ml_collections.ConfigDict({"name": name, **cfg}), base_model=model, base_config=c,
                      tokenizer=tok, class_names=NAMES, templates=("a photo of a {}.", "a {}."))


def _images(n=6, size=16, seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, size, size, 3))


def _perturbed(tree, seed=3, scale=0.05):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [np.asarray(x) + scale * np.asarray(jax.random.normal(k, np.shape(x)))
                                      for x, k in zip(leaves, keys)])


def test_zeroshot_head_and_wise_ft_ends(micro):
  _, _, _, v = micro
  base = run_lib.nest_base(v)
  images = _images()
  zs = _build(micro, "zeroshot")
  want = np.asarray(zs.logits_fn(zs.module, base, images))
  m = _build(micro, "wise_ft")
  start = run_lib.runs.merge_trees(base, {"params": m.fit(base, None, None)["params"]})
  np.testing.assert_allclose(m.logits_fn(m.module, start, images), want, atol=1e-5, rtol=1e-5)
  # a "fine-tuned" model: image tower and head moved, the text tower as frozen
  p = dict(start["params"])
  p["base"] = {**p["base"], "img": _perturbed(p["base"]["img"]), "img_proj": _perturbed(p["base"]["img_proj"])}
  p["head"] = _perturbed(p["head"], seed=4)
  tuned = {**start, "params": p}
  curve = m.candidates(base, tuned)
  assert [lab["alpha"] for lab, _ in curve] == [round(0.1 * i, 1) for i in range(11)]
  zero, one, half = curve[0][1], curve[-1][1], curve[5][1]
  np.testing.assert_allclose(m.logits_fn(m.module, zero, images), want, atol=1e-5, rtol=1e-5)  # α = 0: zero-shot
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(tuned)):  # α = 1: the fine-tuned model, bit for bit
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(m.logits_fn(m.module, one, images), m.logits_fn(m.module, tuned, images))
  w0, w1, wh = (t["params"]["base"]["img_proj"]["kernel"] for t in (zero, one, half))
  np.testing.assert_allclose(wh, 0.5 * (w0 + w1), atol=1e-7)
  assert not np.allclose(wh, w0) and not np.allclose(wh, w1)
  txt = traverse_util.flatten_dict(half["params"]["base"]["txt"])  # frozen: equal at both ends, so unchanged
  for k, x in traverse_util.flatten_dict(base["params"]["base"]["txt"]).items():
    np.testing.assert_allclose(txt[k], x, atol=1e-7)


def test_lp_ft_starts_at_the_linear_probe(micro):
  from vlm_jax.evaluate import linear_probe  # noqa: PLC0415
  _, _, _, v = micro
  base = run_lib.nest_base(v)
  m = _build(micro, "lp_ft", l2_grid=(1e-3, 1e-1))
  x = np.asarray(_images(32, seed=5))
  y = np.arange(32) % 4
  train, val = datasets.Split(x[:16], y[:16]), datasets.Split(x[16:], y[16:])
  fitted = m.fit(base, train, val)
  start = run_lib.runs.merge_trees(base, {"params": fitted.pop("params")})
  z = np.asarray(jax.jit(lambda vv, xx: m.module.apply(vv, xx, method=finetune.FineTune.features))(base, x))
  sel = linear_probe.select_on(z[:16], y[:16], z[16:], y[16:], 4, l2_grid=(1e-3, 1e-1))
  assert fitted["l2"] == sel.l2 and fitted["probe_val_top1"] == float(sel.val_acc.max())
  np.testing.assert_allclose(m.logits_fn(m.module, start, x), sel.probe.logits(z, 0), atol=1e-4, rtol=1e-4)


def test_preflight_rules():
  from vlm_jax import preflight  # noqa: PLC0415
  from vlm_jax.errors import UserError  # noqa: PLC0415
  for head in ("learned", "frozen", "text"):
    preflight.transfer(th.load_config("configs/transfer/wise_ft.py", f"tiny,head={head}"), {})
  c = th.load_config("configs/transfer/finetune.py", "tiny")
  c.method.head = "frozen"  # without the config variant: the head would still train
  with pytest.raises(UserError, match="head=frozen"):
    preflight.transfer(c, {})
  c = th.load_config("configs/transfer/finetune.py", "tiny")
  c.frozen = "^base/"
  with pytest.raises(UserError, match="trains the image tower"):
    preflight.transfer(c, {})
  c = th.load_config("configs/transfer/lp_ft.py", "tiny")
  c.protocol = "base_to_novel"
  with pytest.raises(UserError, match="novel classes"):
    preflight.transfer(c, {})
  c = th.load_config("configs/transfer/wise_ft.py", "tiny")
  c.method.alphas = (0.0, 1.5)
  with pytest.raises(UserError, match="alphas"):
    preflight.transfer(c, {})


@pytest.fixture(scope="module")
def wise_run(micro, tmp_path_factory):
  """A short WiSE-FT run of the micro model on the default shift task: (results, run directory)."""
  c, _, _, v = micro
  base = runs.save_model(str(tmp_path_factory.mktemp("base") / "micro"), c, v)
  cfg = th.load_config("configs/transfer/wise_ft.py", "tiny")
  cfg.init.checkpoint = base
  cfg.shots, cfg.epochs, cfg.test_per_class, cfg.batch_size = 1, 2, 2, 16
  cfg.optimizer.lr = 1e-3  # far enough from zero-shot that the curve's ends differ
  cfg.log_every_steps, cfg.checkpoint_every_steps = 4, 8
  wd = str(tmp_path_factory.mktemp("wise") / "run")
  return run_lib.transfer(cfg, wd, quiet=True), wd


def _run_logits(wd: str, images: np.ndarray) -> np.ndarray:
  """logits = logit_scale · W f(x) + b of the run directory through `vlm_jax.inference.load`."""
  m = inference.load(wd)
  head = np.load(os.path.join(wd, "head.npz"))
  assert float(head["logit_scale"]) == pytest.approx(m.logit_scale)
  return m.logit_scale * m.encode_image(images) @ head["kernel"].T + head["bias"]


def test_wise_ft_run_directory_is_the_chosen_model(wise_run):
  r, wd = wise_run
  curve = r["candidates"]
  assert [c["alpha"] for c in curve] == [round(0.1 * i, 1) for i in range(11)]
  best = max(c["val/top1"] for c in curve)
  assert r["alpha"] == next(c["alpha"] for c in curve if c["val/top1"] == best)  # chosen on validation only
  assert r["val/top1"] == best and r["shift_dataset"] == "textured"
  chosen = next(c for c in curve if c["alpha"] == r["alpha"])
  assert r["top1"] == chosen["top1"] and r["shift/top1"] == chosen["shift/top1"]
  assert curve[0]["top1"] == r["zeroshot/top1"] and curve[0]["shift/top1"] == r["zeroshot/shift/top1"]
  assert os.path.exists(os.path.join(wd, "plots", "wise_ft.png"))
  assert not os.path.exists(os.path.join(wd, "frozen_reference.json"))  # the model is stored, not referenced
  # the directory's logits: inference.load, and the method applied to what runs.load (evaluate's reader) reads
  run = runs.load(wd)
  assert run.step == r["selected_step"] and run.config.model.image.pool_type == "cls"
  ds = datasets.open_dataset("shifted_hues", image_size=16, test_per_class=2)
  size, mean, std = runs.image_transform(run.config)
  x = datasets.normalize(ds.load("test").images, mean, std).astype(np.float32)
  got = _run_logits(wd, x)
  with open(os.path.join(wd, "train", "config.json")) as f:
    cfg = json.load(f)
  tok, model = assembly.build(run.config)
  m = build_method("wise_ft", ml_collections.ConfigDict(cfg["method"]), base_model=model, base_config=run.config,
                   tokenizer=tok, class_names=ds.class_names, templates=ds.templates)
  head = np.load(os.path.join(wd, "head.npz"))
  variables = finetune.with_head(run_lib.nest_base(run.variables), {"kernel": head["kernel"], "bias": head["bias"]})
  want = np.asarray(m.logits_fn(m.module, variables, x))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  test = ds.load("test")
  assert abs(float(np.mean(got.argmax(1) == test.labels)) - r["top1"]) <= 1.0 / len(test.labels)
  # `python -m vlm_jax.evaluate --checkpoint=DIR` (its `evaluate`, with the micro suite's zero-shot evaluator only)
  from vlm_jax.evaluate import cli  # noqa: PLC0415
  suite = th.load_config("configs/eval/synthetic.py", "micro")
  suite.evals = ml_collections.ConfigDict({"zeroshot": suite.evals.zeroshot.to_dict()})
  metrics = cli.evaluate(suite, wd, None)
  assert metrics["step"] == r["selected_step"] and 0.0 <= metrics["zeroshot/top1"] <= 1.0


@pytest.mark.interop
def test_wise_ft_run_converts_to_open_clip_and_hf_with_the_same_logits(wise_run, tmp_path):
  torch = pytest.importorskip("torch")
  open_clip = pytest.importorskip("open_clip")
  pytest.importorskip("safetensors")
  from safetensors.torch import load_file  # noqa: PLC0415

  from vlm_jax import convert, interop  # noqa: PLC0415
  from vlm_jax.interop import open_clip as oc  # noqa: PLC0415
  _, wd = wise_run
  out = str(tmp_path / "wise_ft.safetensors")
  convert.main(["--to", "open_clip", "--input", wd, "--output", out])
  config, _ = interop.load_converted(wd)  # the config convert exported (text tower completed from the tokenizer)
  tmodel = open_clip.CLIP(**oc.open_clip_model_config(config.to_dict())).eval()
  tmodel.load_state_dict(load_file(out))
  x = np.asarray(_images(8, seed=7), np.float32)
  head = np.load(os.path.join(wd, "head.npz"))
  with torch.no_grad():
    z = tmodel.encode_image(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), normalize=True).numpy()
  torch_logits = float(head["logit_scale"]) * z @ head["kernel"].T + head["bias"]
  want = _run_logits(wd, x)
  np.testing.assert_allclose(torch_logits, want, atol=1e-4, rtol=1e-4)
  transformers = pytest.importorskip("transformers")  # and `--to hf`: a transformers CLIPModel directory
  convert.main(["--to", "hf", "--input", wd, "--output", str(tmp_path / "hf")])
  hm = transformers.CLIPModel.from_pretrained(str(tmp_path / "hf")).eval()
  with torch.no_grad():
    zh = hm.get_image_features(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).pooler_output
    zh = torch.nn.functional.normalize(zh, dim=-1).numpy()
  np.testing.assert_allclose(float(head["logit_scale"]) * zh @ head["kernel"].T + head["bias"], want, atol=1e-4,
                             rtol=1e-4)


def test_fine_tuning_beats_zeroshot_and_reports_the_wise_ft_curve(pretrained_vit, tmp_path):
  """WiSE-FT on the pretrained ViT fixture, default shift task (target shifted_hues, shift textured), 4 shots,
  4 epochs of the tiny recipe: θ(1) — plain fine-tuning — beats zero-shot on the target task. The curve on the
  shifted task is printed; whether an α is at least as good as both ends there is reported, not asserted."""
  cfg = th.load_config("configs/transfer/wise_ft.py", "tiny")
  cfg.init.checkpoint = pretrained_vit
  cfg.shots, cfg.epochs, cfg.test_per_class, cfg.log_every_steps = 4, 4, 8, 8
  r = run_lib.transfer(cfg, str(tmp_path / "wise"), quiet=True)
  curve = r["candidates"]
  print(f"chance {r['chance']:.3f} | zero-shot target {r['zeroshot/top1']:.3f} shift {r['zeroshot/shift/top1']:.3f}"
        f" | fine-tuned target {curve[-1]['top1']:.3f} shift {curve[-1]['shift/top1']:.3f} | alpha chosen on "
        f"validation {r['alpha']} -> target {r['top1']:.3f} shift {r['shift/top1']:.3f}")
  for c in curve:
    print(f"  alpha {c['alpha']:.1f}: val {c['val/top1']:.3f} target {c['top1']:.3f} shift {c['shift/top1']:.3f}")
  ends = max(curve[0]["shift/top1"], curve[-1]["shift/top1"])
  inner = [c["alpha"] for c in curve[1:-1] if c["shift/top1"] >= ends]
  print("alphas at least as good as both ends on the shifted task:", inner or "none")
  assert curve[0]["top1"] == r["zeroshot/top1"] and r["zeroshot/top1"] > r["chance"]
  assert curve[-1]["top1"] > r["zeroshot/top1"]  # fine-tuning beats zero-shot on the target task
  assert r["top1"] > r["zeroshot/top1"]          # and so does the α chosen on validation


def test_text_head_is_zeroshot_at_the_base_and_trains_the_text_tower(micro):
  _, _, _, v = micro
  base = run_lib.nest_base(v)
  images = _images()
  zs = _build(micro, "zeroshot")
  m = _build(micro, "finetune", head="text")
  assert m.fit(base, None, None)["params"] == {}  # no separate head
  np.testing.assert_allclose(m.logits_fn(m.module, base, images), zs.logits_fn(zs.module, base, images),
                             atol=1e-5, rtol=1e-5)

  def loss(params):
    out = m.module.apply({**base, "params": params}, {"image": images, "label": jnp.arange(6) % 4})
    return m.loss_fn(out, {"label": jnp.arange(6) % 4})[0]

  g = jax.grad(loss)(base["params"])["base"]
  for tower in ("txt", "img"):
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g[tower])) > 0, tower
