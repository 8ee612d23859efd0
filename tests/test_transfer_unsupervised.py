"""Transfer part 2 (issue 14), the label-free methods: UPL (unsupervised), TPT (test-time), CALIP (training-free
attention) and VCD-style descriptors.

Exactness tests use a randomly initialised micro CLIP; the UPL run test uses the same micro model saved as a run
directory with the training labels replaced by a value that fails on any read; the behaviour tests use the
cached pretrained ViT fixture on the default shift task (shifted_hues).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests import train_helpers as th
from vlm_jax import assembly, runs
from vlm_jax.parallel import partitioning
from vlm_jax.transfer import datasets, run as run_lib
from vlm_jax.transfer.methods import build_method, calip, tpt, upl, vcd

NAMES = ["red circle", "blue square", "green triangle", "yellow star"]


@pytest.fixture(scope="module")
def micro():
  """(config, tokenizer, model, variables) of a random micro CLIP (ViT 16 px, words tokenizer)."""
  c = th.load_config("configs/pretrain/clip.py", "micro")
  tok, model = assembly.build(c)
  v = model.init(jax.random.PRNGKey(0), assembly.example_batch(c, model, 2), train=False)
  return c, tok, model, jax.device_get(dict(partitioning.unbox(v)))


def _method(micro, name, templates=("a photo of a {}.",), descriptions=None, **cfg):
  c, tok, model, v = micro
  m = build_method(name, ml_collections.ConfigDict(cfg), base_model=model, base_config=c, tokenizer=tok,
                   class_names=NAMES, templates=templates, descriptions=descriptions)
  return m, {"params": {"base": v["params"]}}


def _images(n, seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, 16, 16, 3))


_JITTED = {}


def _logits(m, variables, images):
  """The method's logits through one jitted function per method (each new shape compiles once)."""
  if id(m.module) not in _JITTED:  # (the method is kept alive with its function)
    _JITTED[id(m.module)] = (jax.jit(lambda v, x: m.logits_fn(m.module, v, x)), m)
  return np.asarray(_JITTED[id(m.module)][0](variables, images))


def test_calip_at_zero_beta_is_zeroshot_and_search_uses_validation(micro):
  zs, v = _method(micro, "zeroshot", templates=("a photo of a {}.", "a {}."))
  images = _images(6)
  want = _logits(zs, v, images)
  for local in ("tokens", "dense"):
    m, _ = _method(micro, "calip", templates=("a photo of a {}.", "a {}."), local=local)
    neutral = {"params": {**v["params"], "beta": jnp.asarray([1.0, 0.0, 0.0])}}
    np.testing.assert_allclose(_logits(m, neutral, images), want, rtol=1e-6, atol=1e-6)
    active = {"params": {**v["params"], "beta": jnp.asarray([1.0, 2.0, 0.5])}}
    assert np.abs(_logits(m, active, images) - want).max() > 1e-4  # the attention terms are live
  # the search: exact top-1 per grid point; ties keep zero-shot (0, 0)
  terms = np.zeros((3, 4, 2), np.float32)
  terms[0] = [[1, 0], [1, 0], [0, 1], [1, 0]]   # zero-shot: 3 of 4 right for labels [0, 1, 1, 0]
  terms[1] = [[0, 0], [0, 2], [0, 0], [0, 0]]   # β₂ = 1 fixes row 1
  labels = np.asarray([0, 1, 1, 0])
  assert calip.search(terms, labels, [0.0, 1.0], [0.0, 1.0]) == ((1.0, 0.0), 1.0)
  assert calip.search(terms, np.asarray([0, 0, 1, 0]), [0.0, 1.0], [0.0]) == ((0.0, 0.0), 1.0)
  # fit reads the validation split only (the training split is refused by a value that fails when read)
  m, _ = _method(micro, "calip", beta2_grid=(0.0, 1.0), beta3_grid=(0.0,))
  fitted = m.fit(v, None, datasets.Split(np.asarray(images), np.asarray([0, 1, 2, 3, 0, 1])))
  assert fitted["params"]["beta"].shape == (3,) and fitted["params"]["beta"][0] == 1.0


def test_vcd_one_template_descriptor_per_class_is_single_template_zeroshot(micro):
  zs, v = _method(micro, "zeroshot", templates=("a photo of a {}.",))
  images = _images(5)
  one = [(f"a photo of a {n}.",) for n in NAMES]
  m, _ = _method(micro, "vcd", descriptions=one, descriptors="")
  np.testing.assert_allclose(_logits(m, v, images), _logits(zs, v, images), rtol=1e-6, atol=1e-6)
  # several descriptors: the mean of the cosines (not the renormalised mean embedding)
  c, tok, model, mv = micro
  many = [(f"a {n}", f"a photo of a {n}", f"there is a {n}") for n in NAMES]
  m, _ = _method(micro, "vcd", descriptions=many, descriptors="")
  z = model.apply(mv, images, method="encode_image")
  t = model.apply(mv, jnp.asarray(tok([s for d in many for s in d])), method="encode_text").reshape(4, 3, -1)
  want = model.apply(mv, method="logit_scale") * jnp.einsum("be,cde->bcd", z, t).mean(-1)
  np.testing.assert_allclose(_logits(m, v, images), want, rtol=1e-5, atol=1e-5)
  # the shipped descriptor file covers every class of every synthetic shift task, within the words vocabulary
  from vlm_jax.data import synthetic, synthetic_shift  # noqa: PLC0415
  path = vcd.descriptor_path("synthetic")
  vocab = set(synthetic.vocabulary())
  with open(path) as f:
    table = json.load(f)
  for task in synthetic_shift.TASKS:
    for name in synthetic_shift.class_names(task):
      assert len(table[name]) >= 4 and all(w in vocab for s in table[name] for w in s.split()), name


def test_tpt_resets_per_image_and_adapts(micro):
  m, v = _method(micro, "tpt", n_ctx=0, init="a photo of a", views=4, keep=0.5, lr=5e-3)
  images = _images(5, seed=3)
  batch = _logits(m, v, images)
  alone = np.concatenate([_logits(m, v, images[i:i + 1]) for i in range(5)])
  perm = np.asarray([4, 2, 0, 3, 1])
  shuffled = _logits(m, v, images[perm])
  np.testing.assert_allclose(batch, alone, rtol=1e-5, atol=1e-5)        # alone == in a batch
  np.testing.assert_allclose(shuffled, batch[perm], rtol=1e-5, atol=1e-5)  # neighbours do not matter
  again = _logits(m, v, images)
  np.testing.assert_array_equal(again, batch)                          # nothing persists between calls
  # lr 0: no step, exactly CoOp with the phrase context (= the zero-shot "a photo of a {}." classifier)
  still, _ = _method(micro, "tpt", n_ctx=0, init="a photo of a", views=4, keep=0.5, lr=0.0, weight_decay=0.0)
  coop, _ = _method(micro, "coop", n_ctx=0, init="a photo of a")
  cv = {"params": {**v["params"], "ctx": jnp.zeros((4, micro[2].txt.width))}}
  np.testing.assert_allclose(_logits(still, v, images), _logits(coop, cv, images), rtol=1e-5, atol=1e-5)
  assert np.abs(batch - _logits(still, v, images)).max() > 1e-4  # the step changes the prediction
  # the pieces: crops stay inside the image; a full-image box without flip is the identity; the loss
  img = images[0]
  full = jnp.asarray([0.0, 0.0, 16.0, 16.0, 0.0])
  np.testing.assert_allclose(tpt.resized_crop(img, full), img, atol=1e-5)
  np.testing.assert_allclose(tpt.resized_crop(img, full.at[4].set(1.0)), img[:, ::-1], atol=1e-5)
  boxes = np.asarray(tpt.crop_boxes(jax.random.PRNGKey(0), 200, 16))
  assert (boxes[:, :2] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 16 + 1e-4).all()
  assert (boxes[:, 1] + boxes[:, 3] <= 16 + 1e-4).all()
  logits = jnp.asarray([[5.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
  p = jax.nn.softmax(logits[jnp.asarray([0, 2])], axis=-1).mean(0)  # the two most confident views
  np.testing.assert_allclose(tpt.marginal_entropy(logits, 2), -(p * jnp.log(p)).sum(), rtol=1e-6)


def test_upl_selection_rule():
  probs = np.asarray([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
  rows, labels = upl.select_confident(probs, 2)
  assert rows.tolist() == [0, 2, 3, 4] and labels.tolist() == [0, 0, 1, 1]
  rows, labels = upl.select_confident(probs, 1)
  assert rows.tolist() == [0, 3] and labels.tolist() == [0, 1]


class _Unreadable:
  """Labels that fail on any read (indexing, len, arrays, attributes)."""

  def _fail(self, *a, **k):
    raise AssertionError("a training label was read")

  __getitem__ = __len__ = __array__ = __iter__ = __eq__ = _fail

  def __getattr__(self, name):
    raise AssertionError(f"a training label was read (.{name})")


@pytest.fixture(scope="module")
def micro_dir(micro, tmp_path_factory):
  c, _, _, v = micro
  return runs.save_model(str(tmp_path_factory.mktemp("base") / "micro"), c, v)


def test_upl_run_never_reads_a_label(micro_dir, tmp_path, monkeypatch):
  load = datasets.Dataset.load
  reads = []

  def poisoned(self, split, **kw):
    reads.append(split)
    out = load(self, split, **kw)
    return out if split == "test" else datasets.Split(out.images, _Unreadable())

  monkeypatch.setattr(datasets.Dataset, "load", poisoned)
  c = th.load_config("configs/transfer/upl.py", "tiny")
  c.init.checkpoint = micro_dir
  c.dataset, c.shots, c.epochs, c.test_per_class, c.batch_size = "shifted_hues", 2, 1, 1, 16
  c.method.n_prompts = 2
  r = run_lib.transfer(c, str(tmp_path / "upl"), quiet=True)
  assert reads == ["train", "test"], reads
  assert r["labels_used"] is False and r["val_images"] == 0 and 0 < r["train_images"] <= 2 * 64
  assert r["selected_step"] == r["steps"] > 0 and 0.0 <= r["top1"] <= 1.0
  with open(os.path.join(tmp_path, "upl", "results.json")) as f:
    assert json.load(f)["labels_used"] is False


def test_preflight_rules():
  from vlm_jax import preflight  # noqa: PLC0415
  from vlm_jax.errors import UserError  # noqa: PLC0415
  for name in ("upl", "tpt", "calip", "vcd"):
    preflight.transfer(th.load_config(f"configs/transfer/{name}.py", "tiny"), {})
  bad = [("upl", ("select",), "val", "no labelled validation"), ("upl", ("protocol",), "base_to_novel", "unlabelled"),
         ("tpt", ("method", "views"), 1, "views"), ("tpt", ("method", "init"), "", "phrase"),
         ("calip", ("method", "beta3_grid"), (-1.0,), "beta3_grid"),
         ("vcd", ("method", "descriptors"), "", "descriptor sentences"),
         ("vcd", ("method", "descriptors"), "no_such_file", "unknown descriptor file")]
  for name, path, value, words in bad:
    c = th.load_config(f"configs/transfer/{name}.py", "tiny")
    node = c
    for p in path[:-1]:
      node = node[p]
    node[path[-1]] = value
    with pytest.raises(UserError, match=words):
      preflight.transfer(c, {})


# --- behaviour on the pretrained ViT fixture, the default shift task (shifted_hues: 64 classes, chance 1.6 %) ---


def test_upl_learns_from_pseudo_labels_alone(pretrained_vit, tmp_path, capsys):
  """UPL's tiny recipe through the entry point's run at K = 16, 4 epochs instead of 10 (test time): pseudo-labels
  from the unlabelled pool only, and a learning effect well beyond chance. UPL does not beat zero-shot on this
  fixture: its pseudo-labels are only as accurate as zero-shot (confidence-based selection hardly sharpens them).
  Measured: on the ViT fixture before the ResNet-convolution / GELU change, 12.5 % after 4 epochs and 13.2 % after
  10 against zero-shot 11.9 %; on the rebuilt fixture (vit-732bf87930d9) 15.8 % after 4 epochs and 14.9 % after 10
  against zero-shot 17.0 % (chance 1.6 %)."""
  c = th.load_config("configs/transfer/upl.py", "tiny")
  c.init.checkpoint, c.shots, c.epochs = pretrained_vit, 16, 4
  r = run_lib.transfer(c, str(tmp_path / "upl"), quiet=True)
  with capsys.disabled():
    print(f"\nUPL (no labels) {r['top1']:.4f} | zero-shot {r['zeroshot/top1']:.4f} | chance {r['chance']:.4f} | "
          f"{r['train_images']} pseudo-labelled images, {r['steps']} steps")
  assert r["labels_used"] is False and r["val_images"] == 0
  assert r["top1"] > 4 * r["chance"] and r["zeroshot/top1"] > 4 * r["chance"]


def test_tpt_lowers_its_objective_on_the_fixture(pretrained_vit, capsys):
  """TPT on the first test image of every class (64): its one step lowers the entropy of the averaged
  confident-view prediction (TPT's objective) for nearly every image; accuracy vs zero-shot is printed, not
  asserted. Measured: on the full test split (the benchmark, 1,024 images) TPT 12.2 % vs zero-shot 11.9 %
  (+3 images); on the first 2 test images per class (128) 10.9 % vs 11.7 % (−1 image); here (64) 9.4 % vs
  10.9 %, the entropy 1.436 → 1.314 on average, lower for 98 % of the images. TPT does not beat
  zero-shot beyond noise on this fixture (its errors are shape errors of the image tower, which a text
  context step cannot fix), so the target "TPT beats zero-shot" is reported as not met."""
  cfg, tok, model, base_vars = run_lib.load_base(pretrained_vit)
  size, mean, std = runs.image_transform(cfg)
  ds = datasets.open_dataset("shifted_hues", image_size=size, test_per_class=1)
  test = ds.load("test")
  x = datasets.normalize(test.images, mean, std).astype(np.float32)
  variables = run_lib.nest_base(base_vars)
  build = lambda name, **kw: build_method(name, ml_collections.ConfigDict(kw), base_model=model,  # noqa: E731
                                          base_config=cfg, tokenizer=tok, class_names=ds.class_names,
                                          templates=ds.templates)
  zs = build("zeroshot")
  m = build("tpt", n_ctx=0, init="a photo of a")

  obj = jax.jit(lambda v, im: m.module.apply(v, im, method=tpt.TPT.objective))
  before, after = np.asarray(obj(variables, x)).T
  acc = {name: float(np.mean(np.argmax(_logits(meth, variables, x), 1) == test.labels))
         for name, meth in (("zeroshot", zs), ("tpt", m))}
  with capsys.disabled():
    print(f"\nTPT {acc['tpt']:.4f} | zero-shot {acc['zeroshot']:.4f} | chance {1 / ds.num_classes:.4f} | marginal "
          f"entropy {before.mean():.3f} -> {after.mean():.3f} (lower for {np.mean(after < before):.0%} of images)")
  assert np.mean(after < before) > 0.9 and after.mean() < before.mean()
  assert acc["tpt"] > 1 / ds.num_classes  # above chance (not above zero-shot: see the docstring)
