"""Evaluation metrics against straightforward reference implementations and CLIP_benchmark's definitions;
prompt files; the zero-shot ensemble; the linear-probe protocol (never sees test labels); the synthetic
retrieval split."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import scipy.optimize

from vlm_jax.data import synthetic, synthetic_eval
from vlm_jax.errors import UserError
from vlm_jax.embedding import classifier, prompts
from vlm_jax.evaluate import linear_probe, retrieval, zeroshot

DATA = {"name": "synthetic", "image_size": 16, "synthetic": {"eval_per_class": 2}}


# ---- classification metrics ------------------------------------------------------------------------------------

def _ref_topk(logits, labels, k):
  hits = 0
  for row, y in zip(logits.tolist(), labels.tolist()):
    ranked = sorted(range(len(row)), key=lambda j: -row[j])
    hits += y in ranked[:k]
  return hits / len(labels)


def _ref_mean_per_class_recall(pred, labels):
  recalls = []
  for c in sorted(set(labels.tolist())):
    rows = [i for i, y in enumerate(labels.tolist()) if y == c]
    recalls.append(sum(pred[i] == c for i in rows) / len(rows))
  return sum(recalls) / len(recalls)


def test_classification_metrics_match_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(300, 17))
  labels = rng.integers(0, 15, size=300)  # classes 15, 16 never occur: excluded from the per-class mean
  m = zeroshot.classification_metrics(logits, labels)
  assert m["top1"] == pytest.approx(_ref_topk(logits, labels, 1))
  assert m["top5"] == pytest.approx(_ref_topk(logits, labels, 5))
  assert m["mean_per_class_recall"] == pytest.approx(_ref_mean_per_class_recall(logits.argmax(1), labels))


def test_mean_per_class_recall_is_balanced_accuracy():
  # 9 images of class 0 (all right), 1 of class 1 (wrong): accuracy 0.9, balanced accuracy (1 + 0) / 2
  logits = np.array([[1.0, 0.0]] * 10)
  labels = np.array([0] * 9 + [1])
  m = zeroshot.classification_metrics(logits, labels, ks=(1,))
  assert m["top1"] == pytest.approx(0.9) and m["mean_per_class_recall"] == pytest.approx(0.5)
  assert "top5" not in zeroshot.classification_metrics(logits, labels)  # k > #classes is not reported


def _ref_average_precision(scores, targets):
  aps = []
  for c in range(scores.shape[1]):
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i, c])
    tp, precisions = 0, []
    for rank, i in enumerate(ranked, 1):
      if targets[i, c]:
        tp += 1
        precisions.append(tp / rank)
    aps.append(sum(precisions) / len(precisions) if precisions else 0.0)  # CLIP_benchmark: 0 without positives
  return aps


def test_mean_average_precision_matches_reference():
  rng = np.random.default_rng(1)
  scores = rng.normal(size=(60, 9))
  targets = (rng.random((60, 9)) < 0.25).astype(np.int32)
  targets[:, 4] = 0  # a class without positives counts as AP 0 in the mean (CLIP_benchmark)
  ref = _ref_average_precision(scores, targets)
  np.testing.assert_allclose(zeroshot.average_precision_per_class(scores, targets), ref, rtol=1e-12)
  assert zeroshot.multilabel_metrics(scores, targets)["mean_average_precision"] == pytest.approx(np.mean(ref))
  # a perfect ranking has AP 1
  perfect = zeroshot.average_precision_per_class(targets + 0.01 * rng.random(targets.shape), targets)
  assert np.allclose(perfect[targets.sum(0) > 0], 1.0)


def test_confusion_matrix():
  cm = zeroshot.confusion_matrix(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 3)
  assert cm.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


# ---- prompts and the zero-shot ensemble ------------------------------------------------------------------------

def test_bundled_templates():
  assert {"clip_imagenet", "generic", "synthetic"} <= set(prompts.available())
  clip = prompts.load_templates("clip_imagenet")
  assert len(clip) == 80 and len(set(clip)) == 80 and all(t.count("{}") == 1 for t in clip)
  assert clip[0] == "a bad photo of a {}." and "a origami {}." in clip  # verbatim, article quirks included
  assert prompts.fill("itap of a {}.", "goldfish") == "itap of a goldfish."
  assert len(prompts.load_templates("generic")) >= 3


def test_template_and_description_files(tmp_path):
  path = tmp_path / "t.txt"
  path.write_text("# comment\na photo of a {c}.\n\nart of the {}.\n")
  assert prompts.load_templates(str(path)) == ("a photo of a {}.", "art of the {}.")
  assert prompts.load_templates(["x {}"]) == ("x {}",)
  for bad in (["no placeholder"], ["two {} {}"], ["brace {} {x}"]):
    with pytest.raises(UserError):
      prompts.load_templates(bad)
  with pytest.raises(UserError, match="unknown template set"):
    prompts.load_templates("nosuch")
  desc = tmp_path / "cupl.json"
  desc.write_text(json.dumps({"cat": ["A cat is a small furry pet.", "Cats have whiskers."], "dog": ["A dog."]}))
  assert prompts.load_descriptions(str(desc), ["dog", "cat"]) == [("A dog.",), ("A cat is a small furry pet.",
                                                                               "Cats have whiskers.")]
  with pytest.raises(UserError, match="bird"):
    prompts.load_descriptions(str(desc), ["cat", "bird"])


class _TableText:
  """A tokenizer + text encoder pair: each distinct text gets a fixed random (unnormalised) vector."""

  def __init__(self, dim=8, seed=0):
    self.rng, self.dim, self.ids, self.vecs = np.random.default_rng(seed), dim, {}, []

  def tokenize(self, texts):
    for t in texts:
      if t not in self.ids:
        self.ids[t] = len(self.ids)
        self.vecs.append(self.rng.normal(size=self.dim) * self.rng.uniform(0.5, 3))
    return np.array([[self.ids[t]] for t in texts])

  def encode(self, ids):
    return np.stack([self.vecs[i] for i in ids[:, 0]])

  def vec(self, text):
    v = self.vecs[self.ids[text]]
    return v / np.linalg.norm(v)


def test_class_embeddings_are_the_clip_ensemble_with_cupl_descriptions():
  tt = _TableText()
  names, templates = ["apple", "pear"], ["a photo of a {}.", "art of the {}."]
  descriptions = [["An apple is red."], ["A pear is green.", "Pears are sweet.", "A pear."]]
  emb = classifier.class_embeddings(tt.encode, tt.tokenize, names, templates, batch_size=3,
                                  descriptions=descriptions)
  for c, name in enumerate(names):
    texts = [t.replace("{}", name) for t in templates] + descriptions[c]
    mean = np.mean([tt.vec(t) for t in texts], axis=0)
    np.testing.assert_allclose(emb[c], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
  only = classifier.class_embeddings(tt.encode, tt.tokenize, names, descriptions=descriptions)
  np.testing.assert_allclose(only[0], tt.vec("An apple is red."), rtol=1e-5, atol=1e-6)
  texts = classifier.class_prompts(["orange circle"], ["a {}"], fix_articles=True)
  assert texts == [["an orange circle"]]
  assert classifier.class_prompts(["orange"], ["a origami {}."]) == [["a origami orange."]]  # verbatim by default


# ---- retrieval ------------------------------------------------------------------------------------------------

def _ref_retrieval(zi, zt, owner, k):
  i2t = np.mean([any(owner[j] == i for j in sorted(range(len(zt)), key=lambda j: -(zi[i] @ zt[j]))[:k])
                 for i in range(len(zi))])
  t2i = np.mean([owner[j] in sorted(range(len(zi)), key=lambda i: -(zi[i] @ zt[j]))[:k] for j in range(len(zt))])
  return i2t, t2i


def test_retrieval_recall_matches_reference():
  rng = np.random.default_rng(2)
  n = 40
  owner = np.repeat(np.arange(n), rng.integers(1, 6, size=n))  # 1–5 captions per image
  zi = rng.normal(size=(n, 6))
  zt = zi[owner] + 1.5 * rng.normal(size=(len(owner), 6))
  zi /= np.linalg.norm(zi, axis=1, keepdims=True)
  zt /= np.linalg.norm(zt, axis=1, keepdims=True)
  m = retrieval.retrieval_metrics(zi, zt, owner, ks=(1, 5, 10), chunk=7)
  for k in (1, 5, 10):
    i2t, t2i = _ref_retrieval(zi, zt, owner, k)
    assert m[f"image_to_text_R@{k}"] == pytest.approx(i2t)
    assert m[f"text_to_image_R@{k}"] == pytest.approx(t2i)
  assert 0 < m["image_to_text_R@1"] < m["image_to_text_R@10"] < 1


def test_recall_at_k_is_at_least_one_hit():
  # image 0 has two captions ranked 1st and 4th: a hit at k=1 (CLIP_benchmark counts recall > 0, not 1/2)
  scores = np.array([[0.9, 0.1, 0.2, 0.5, 0.3]])
  positive = np.array([[True, False, False, True, False]])
  hits = retrieval.hits_at_k(scores, positive, ks=(1, 2))
  assert hits[1].tolist() == [True] and hits[2].tolist() == [True]
  # its best caption ranks 3rd: no hit at 1 or 2, a hit at 3
  scores = np.array([[0.1, 0.9, 0.8, 0.5, 0.3]])
  positive = np.array([[False, False, False, True, True]])
  assert [retrieval.hits_at_k(scores, positive, (k,))[k][0] for k in (1, 2, 3)] == [False, False, True]


def test_collapsed_embeddings_get_no_recall():
  z = np.ones((8, 4))
  m = retrieval.retrieval_metrics(z, np.ones((16, 4)), np.repeat(np.arange(8), 2), ks=(1, 5))
  assert all(v == 0.0 for v in m.values())


def test_retrieval_jsonl(tmp_path):
  from PIL import Image
  rng = np.random.default_rng(3)
  (tmp_path / "img").mkdir()
  lines = []
  for i in range(3):
    Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
    lines.append(json.dumps({"image": f"img/{i}.png", "captions": [f"picture {i}", f"photo {i}"]}))
  path = tmp_path / "set.jsonl"
  path.write_text("\n".join(lines) + "\n")
  out = retrieval.load_jsonl(str(path), image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
  assert out["image"].shape == (3, 16, 16, 3) and out["captions"][2] == ["picture 2", "photo 2"]
  path.write_text(lines[0] + "\n" + json.dumps({"image": "img/9.png", "captions": ["x"]}) + "\n")
  with pytest.raises(UserError, match=":2: cannot read image"):
    retrieval.load_jsonl(str(path), image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
  path.write_text(json.dumps({"image": "img/0.png", "captions": []}) + "\n")
  with pytest.raises(UserError, match=":1: expected"):
    retrieval.load_jsonl(str(path), image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)


# ---- linear probe ---------------------------------------------------------------------------------------------

def _clusters(n_per_class, classes=6, dim=5, seed=0, noise=1.2):
  rng = np.random.default_rng(seed)
  centers = np.random.default_rng(99).normal(size=(classes, dim)) * 2
  y = np.repeat(np.arange(classes), n_per_class)
  return (centers[y] + noise * rng.normal(size=(len(y), dim))).astype(np.float32), y


def test_fit_reaches_the_regularised_optimum():
  x, y = _clusters(12)
  l2 = 1e-2
  probe = linear_probe.fit(x, y, 6, [l2], steps=500, tol=0.0)
  xs = (x - x.mean(0)) / (x.std(0) + 1e-6)
  onehot = np.eye(6)[y]

  def objective(theta):  # the same objective, written independently, minimised by scipy's L-BFGS-B
    w, b = theta[:30].reshape(5, 6), theta[30:]
    z = xs @ w + b
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    p = np.exp(logp)
    loss = -np.mean(np.sum(onehot * logp, 1)) + 0.5 * l2 * np.sum(w ** 2)
    gz = (p - onehot) / len(x)
    return loss, np.concatenate([(xs.T @ gz + l2 * w).ravel(), gz.sum(0)])

  ref = scipy.optimize.minimize(objective, np.zeros(36), jac=True, method="L-BFGS-B",
                                options={"gtol": 1e-10, "ftol": 1e-14, "maxiter": 5000})
  ours = np.concatenate([probe.kernel[0].ravel(), probe.bias[0]])
  assert objective(ours)[0] == pytest.approx(ref.fun, abs=1e-5)
  np.testing.assert_allclose(probe.kernel[0], ref.x[:30].reshape(5, 6), atol=2e-2)


def test_carve_validation_is_stratified_and_disjoint():
  y = np.repeat(np.arange(4), [10, 5, 2, 1])
  tr, va = linear_probe.carve_validation(y, 0.2, seed=0)
  assert not set(tr) & set(va) and sorted(set(tr) | set(va)) == list(range(len(y)))
  assert [int(np.sum(y[va] == c)) for c in range(4)] == [2, 1, 1, 0]


def test_linear_probe_never_sees_test_labels(monkeypatch):
  x, y = _clusters(10, seed=0)
  tx, ty = _clusters(10, seed=1)
  grid = (1e-4, 1e-2, 1.0, 10.0)
  fitted = []
  real_fit = linear_probe.fit
  monkeypatch.setattr(linear_probe, "fit", lambda fx, *a, **k: fitted.append(fx.copy()) or real_fit(fx, *a, **k))
  base = linear_probe.linear_probe(x, y, tx, ty, 6, l2_grid=grid)
  assert base["top1"] > 0.5
  test_rows = {r.tobytes() for r in tx}
  assert fitted and not any(r.tobytes() in test_rows for fx in fitted for r in fx)  # no test row is fitted
  for seed in range(3):  # permuting (or replacing) the test labels cannot change the selected λ
    shuffled = np.random.default_rng(seed).permutation(ty)
    other = linear_probe.linear_probe(x, y, tx, shuffled, 6, l2_grid=grid)
    assert other["l2"] == base["l2"] and other["val_top1"] == base["val_top1"]
  assert linear_probe.linear_probe(x, y, tx, np.zeros_like(ty), 6, l2_grid=grid)["l2"] == base["l2"]


def test_probe_plot(tmp_path):
  x, y = _clusters(8)
  linear_probe.linear_probe(x, y, x, y, 6, l2_grid=(1e-3, 1e-1), plot_path=str(tmp_path / "p" / "l2.png"))
  assert (tmp_path / "p" / "l2.png").stat().st_size > 1000


def test_few_shot():
  x, y = _clusters(8)
  tx, ty = _clusters(10, seed=1)
  fit_idx, val_idx = linear_probe.sample_shots(y, 2, 2, seed=0)
  assert not set(fit_idx) & set(val_idx) and all(np.sum(y[fit_idx] == c) == 2 for c in range(6))
  m = linear_probe.few_shot(x, y, tx, ty, 6, shots=(1, 2), seeds=3, l2_grid=(1e-3, 1e-1))
  assert set(m) == {f"{k}shot_{s}" for k in (1, 2) for s in ("top1", "top1_std", "l2")}
  assert 0 <= m["1shot_top1_std"] < 0.5 and m["2shot_top1"] > 1 / 6
  with pytest.raises(UserError, match="5-shot"):
    linear_probe.few_shot(x, y, tx, ty, 6, shots=(5,), seeds=1)


# ---- the synthetic retrieval split ----------------------------------------------------------------------------

def test_training_stream_is_unchanged():
  """The retrieval split and caption sampler must not touch the training data: a golden hash of train scenes
  and pixels (computed before they were added)."""
  src = synthetic.SyntheticShapes("train", image_size=32)
  h = hashlib.sha256()
  for i in range(100):
    h.update(repr(src.scene(i)).encode())
  for i in range(4):
    h.update(src[i]["image"].tobytes())
  assert h.hexdigest() == "2199533fe88d724abfb25725bcde2d0c9df1a5213656d2190c5a810185f26e1f"


def test_synthetic_retrieval_set():
  src = synthetic.SyntheticShapes("eval_retrieval", image_size=16)
  train = synthetic.SyntheticShapes("train", image_size=16)
  assert src.scene(0) != train.scene(0)
  assert not set(c for i in range(200) for c in src.scene(i).classes) & set(src.unseen_classes.tolist())
  assert max(len(src.scene(i).classes) for i in range(50)) > 1  # multi-object scenes, like training
  caps = src.captions(src.scene(3), 5, np.random.default_rng(0))
  assert len(set(caps)) == 5 and caps[0] == src.scene(3).caption
  data = synthetic_eval.retrieval_set(DATA, image_size=16, num_images=40, captions_per_image=3)
  assert data["image"].shape == (40, 16, 16, 3) and data["image_uint8"].dtype == np.uint8
  assert all(len(set(c)) == 3 for c in data["captions"])
  assert data["multi_hot"].sum(1).tolist() == [len(set(src.scene(i).classes)) for i in range(40)]
  again = synthetic_eval.retrieval_set(DATA, image_size=16, num_images=40, captions_per_image=3)
  assert again["captions"] == data["captions"]


def test_synthetic_probe_sets_do_not_overlap_the_test_images():
  sets = synthetic_eval.probe_sets(DATA, image_size=16, train_per_class=2)
  tr, te = sets["train"], sets["test"]
  assert len(sets["class_names"]) == 64
  assert np.bincount(tr["label"], minlength=64).tolist() == [2] * 64
  assert np.bincount(te["label"], minlength=64).tolist() == [2] * 64
  assert not {im.tobytes() for im in tr["image"]} & {im.tobytes() for im in te["image"]}


def test_jsonl_retrieval_evaluator_with_a_model(tmp_path):
  """make_evaluators on a JSONL retrieval set with a (random) micro model: keys renamed to the evaluator's name."""
  import jax
  from PIL import Image

  from tests import train_helpers as th
  from vlm_jax import assembly
  from vlm_jax.evaluate import make_evaluators
  config = th.micro_config()
  tokenizer, model, _ = assembly.assemble(config)[:3]
  rng = np.random.default_rng(4)
  lines = []
  for i in range(5):
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(tmp_path / f"{i}.jpg")
    lines.append(json.dumps({"image": f"{i}.jpg", "captions": ["a red circle", f"a blue square {i}"]}))
  (tmp_path / "set.jsonl").write_text("\n".join(lines))
  evals = {"coco": {"kind": "retrieval_jsonl", "path": str(tmp_path / "set.jsonl"), "ks": (1, 5)}}
  fns = make_evaluators(evals, model=model, tokenizer=tokenizer, data_config=config.data,
                        plot_dir=str(tmp_path / "plots"))
  variables = model.init(jax.random.PRNGKey(0), {"image": np.zeros((1, 16, 16, 3), np.float32),
                                                 "text": tokenizer(["a"])})
  m = fns["coco"](variables)
  assert m["coco/num_images"] == 5 and m["coco/num_captions"] == 10
  assert set(m) == {f"coco/{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5)} | {
      "coco/num_images", "coco/num_captions"}
  assert all(0.0 <= m[k] <= 1.0 for k in m if "_R@" in k)
  assert (tmp_path / "plots" / "retrieval_jsonl_top.png").exists()
  with pytest.raises(UserError, match="nosuch"):
    make_evaluators({"r": {"kind": "retrieval_jsonl", "path": "x", "nosuch": 1}}, model=model,
                    tokenizer=tokenizer, data_config=config.data)
  with pytest.raises(UserError, match="does not exist"):
    make_evaluators({"r": {"kind": "retrieval_jsonl", "path": str(tmp_path / "no.jsonl")}}, model=model,
                    tokenizer=tokenizer, data_config=config.data)
