"""Evaluators on real datasets (image folders, tar shards) with a random micro model: every metric equals a
straightforward numpy computation on embeddings computed with the model directly."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from tests import shard_fixtures
from vlm_jax.data import shards, sources, transforms
from vlm_jax.errors import UserError
from vlm_jax.embedding import prompts
from vlm_jax.evaluate import KINDS, linear_probe, make_evaluators

# words of the micro model's word tokenizer (unknown words would all map to one id and tie)
CLASSES = ("red_circle", "blue_square", "green_star", "pink_heart", "yellow_moon", "orange_ring")
COLOURS = ("red", "blue", "green", "pink", "purple", "yellow", "orange")


def _folder(root, per_class: int, seed: int, classes=CLASSES) -> str:
  rng = np.random.default_rng(seed)
  for c, name in enumerate(classes):
    os.makedirs(root / name)
    for i in range(per_class):
      arr = rng.integers(0, 256, (20, 26, 3), dtype=np.uint8)
      arr[..., c % 3] = 40 * c  # a class-dependent channel, so probes have something to learn
      Image.fromarray(arr).save(root / name / f"{i}.png")
  return str(root)


@pytest.fixture(scope="module")
def micro():
  import jax

  from tests import train_helpers as th
  from vlm_jax import assembly
  config = th.micro_config()
  tokenizer, model, _ = assembly.assemble(config)[:3]
  size = int(config.data.image_size)
  variables = model.init(jax.random.PRNGKey(0), {"image": np.zeros((1, size, size, 3), np.float32),
                                                 "text": tokenizer(["a"])})
  mean, std = (tuple(config.data.get(k, None) or d) for k, d in
               (("mean", transforms.CLIP_MEAN), ("std", transforms.CLIP_STD)))

  apply_img = jax.jit(lambda x: model.apply(variables, x, method="encode_image"))
  apply_txt = jax.jit(lambda t: model.apply(variables, t, method="encode_text"))

  def zimg(images_uint8):
    z = np.asarray(apply_img(transforms.normalize(images_uint8, mean, std)), np.float64)
    return z / np.linalg.norm(z, axis=1, keepdims=True)

  def ztxt(texts):
    z = np.asarray(apply_txt(tokenizer(texts)), np.float64)
    return z / np.linalg.norm(z, axis=1, keepdims=True)

  def evaluators(evals, plot_dir=None):  # batch 8 everywhere: one compiled shape per encoder
    evals = {k: {"batch_size": 8, **v} for k, v in evals.items()}
    return make_evaluators(evals, model=model, tokenizer=tokenizer, data_config=config.data, plot_dir=plot_dir)
  return {"config": config, "variables": variables, "size": size, "zimg": zimg, "ztxt": ztxt,
          "evaluators": evaluators}


def test_zeroshot_on_an_image_folder(micro, tmp_path):
  root = _folder(tmp_path / "test", 3, seed=1)
  evals = {"pets": {"kind": "zeroshot", "dataset": f"folder:{root}", "templates": "generic"}}
  m = micro["evaluators"](evals, plot_dir=str(tmp_path / "plots"))["pets"](micro["variables"])
  assert set(m) == {"pets/top1", "pets/top5", "pets/mean_per_class_recall"}
  # reference: the CLIP ensemble written out, on embeddings from model.apply
  images = sources.load_arrays(sources.ImageFolder(root, image_size=micro["size"]))
  templates = prompts.load_templates("generic")
  cls = []
  for name in sorted(CLASSES):  # labels: class folders in sorted order
    z = micro["ztxt"]([t.replace("{}", name.replace("_", " ")) for t in templates]).mean(0)
    cls.append(z / np.linalg.norm(z))
  logits = micro["zimg"](images["image"]) @ np.stack(cls).T
  y = images["label"]
  order = np.argsort(-logits, axis=1)
  assert m["pets/top1"] == pytest.approx(np.mean(order[:, 0] == y))
  assert m["pets/top5"] == pytest.approx(np.mean([y[i] in order[i, :5] for i in range(len(y))]))
  recall = np.mean([np.mean(order[y == c, 0] == c) for c in range(len(CLASSES))])
  assert m["pets/mean_per_class_recall"] == pytest.approx(recall)
  assert (tmp_path / "plots" / "zeroshot_confusion.png").exists()


def test_zeroshot_class_names_descriptions_and_limit(micro, tmp_path):
  import json
  root = _folder(tmp_path / "test", 2, seed=2, classes=("a", "b", "c"))
  (tmp_path / "names.txt").write_text("red box\ngreen box\nblue box\n")
  (tmp_path / "cupl.json").write_text(json.dumps({n: [f"a photo of a {n}.", f"a {n} on the left"]
                                                  for n in ("red box", "green box", "blue box")}))
  evals = {"z": {"kind": "zeroshot", "dataset": f"folder:{root}", "templates": "",
                 "descriptions": str(tmp_path / "cupl.json"), "class_names": str(tmp_path / "names.txt"),
                 "limit": 3}}
  m = micro["evaluators"](evals)["z"](micro["variables"])
  assert set(m) == {"z/top1", "z/mean_per_class_recall"}  # 3 classes: no top5
  images = sources.load_arrays(sources.ImageFolder(root, image_size=micro["size"]))
  keep = [0, 2, 5]  # limit=3 of 6: evenly spaced, one image of each class
  cls = []
  for n in ("red box", "green box", "blue box"):
    z = micro["ztxt"]([f"a photo of a {n}.", f"a {n} on the left"]).mean(0)
    cls.append(z / np.linalg.norm(z))
  pred = (micro["zimg"](images["image"][keep]) @ np.stack(cls).T).argmax(1)
  assert m["z/top1"] == pytest.approx(np.mean(pred == images["label"][keep]))


def test_linear_probe_and_fewshot_on_image_folders(micro, tmp_path):
  train = _folder(tmp_path / "train", 5, seed=3, classes=CLASSES[:4])
  test = _folder(tmp_path / "test", 2, seed=4, classes=CLASSES[:4])
  common = {"train_dataset": f"folder:{train}", "test_dataset": f"folder:{test}", "steps": 30,
            "l2_grid": (1e-4, 1e-2, 1.0)}
  fns = micro["evaluators"]({"lp": {"kind": "linear_probe", **common},
                             "fs": {"kind": "fewshot", "shots": (1, 2), "seeds": 2, **common}},
                            plot_dir=str(tmp_path / "plots"))
  lp, fs = fns["lp"](micro["variables"]), fns["fs"](micro["variables"])
  assert set(lp) == {f"lp/{k}" for k in ("top1", "mean_per_class_recall", "l2", "val_top1")}
  assert set(fs) == {f"fs/{k}shot_{s}" for k in (1, 2) for s in ("top1", "top1_std", "l2")}
  tr = sources.load_arrays(sources.ImageFolder(train, image_size=micro["size"]))
  te = sources.load_arrays(sources.ImageFolder(test, image_size=micro["size"]))
  xtr, xte = micro["zimg"](tr["image"]), micro["zimg"](te["image"])
  ref = linear_probe.linear_probe(xtr, tr["label"], xte, te["label"], 4, steps=30, l2_grid=(1e-4, 1e-2, 1.0))
  assert lp["lp/l2"] == ref["l2"]
  assert lp["lp/top1"] == pytest.approx(ref["top1"])
  refit = linear_probe.fit(xtr, tr["label"], 4, [ref["l2"]], steps=30)  # top1 written out from the refit
  assert lp["lp/top1"] == pytest.approx(np.mean(refit.logits(xte, 0).argmax(1) == te["label"]))
  ref_fs = linear_probe.few_shot(xtr, tr["label"], xte, te["label"], 4, shots=(1, 2), seeds=2, steps=30,
                                 l2_grid=(1e-4, 1e-2, 1.0))
  assert fs["fs/1shot_top1"] == pytest.approx(ref_fs["1shot_top1"])
  assert fs["fs/2shot_top1"] == pytest.approx(ref_fs["2shot_top1"])
  assert (tmp_path / "plots" / "linear_probe_l2.png").exists()


def test_retrieval_shards_with_several_captions(micro, tmp_path):
  w = shards.ShardWriter(str(tmp_path / "sh"), shard_size=3, prefix="coco")
  for i in range(7):
    c = COLOURS[i]
    meta = {"captions": [f"a {c} circle", f"a photo of a {c} square", f"{c} star on the left"]} if i % 2 else None
    w.write(f"s{i}", shard_fixtures.image_bytes(i), "png", f"a {c} circle", meta=meta)  # repeated: kept once
  w.close(stats_file=False)
  spec = str(tmp_path / "sh" / "coco-*.tar")
  evals = {"coco": {"kind": "retrieval_shards", "shards": spec, "ks": (1, 5)}}
  m = micro["evaluators"](evals, plot_dir=str(tmp_path / "plots"))["coco"](micro["variables"])
  assert set(m) == {f"coco/{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5)} | {
      "coco/num_images", "coco/num_captions"}
  captions = [[f"a {c} circle"] + ([f"a photo of a {c} square", f"{c} star on the left"] if i % 2 else [])
              for i, c in enumerate(COLOURS)]
  assert m["coco/num_images"] == 7 and m["coco/num_captions"] == sum(map(len, captions))
  size = micro["size"]
  images = np.stack([transforms.resize_center_crop(transforms.decode_image(shard_fixtures.image_bytes(i)), size)
                     for i in range(7)])
  texts = [c for caps in captions for c in caps]
  owner = np.array([i for i, caps in enumerate(captions) for _ in caps])
  sim = micro["zimg"](images) @ micro["ztxt"](texts).T
  for k in (1, 5):
    i2t = np.mean([np.any(owner[np.argsort(-sim[i])[:k]] == i) for i in range(7)])
    t2i = np.mean([owner[t] in np.argsort(-sim[:, t])[:k] for t in range(len(texts))])
    assert m[f"coco/image_to_text_R@{k}"] == pytest.approx(i2t)
    assert m[f"coco/text_to_image_R@{k}"] == pytest.approx(t2i)
  assert (tmp_path / "plots" / "retrieval_shards_top.png").exists()


def test_bad_options_are_one_line_user_errors(micro, tmp_path):
  root = _folder(tmp_path / "f", 1, seed=5, classes=("a", "b"))
  cases = [({"kind": "zeroshot", "dataset": f"folder:{root}", "nosuch": 1}, "nosuch"),
           ({"kind": "zeroshot"}, "needs a dataset"),
           ({"kind": "zeroshot", "dataset": f"folder:{tmp_path / 'missing'}"}, "does not exist"),
           ({"kind": "zeroshot", "dataset": f"folder:{root}", "class_names": ["x"]}, "1 class names given"),
           ({"kind": "linear_probe", "train_dataset": f"folder:{root}"}, "test_dataset needs a dataset"),
           ({"kind": "fewshot", "train_dataset": f"folder:{root}", "test_dataset": f"folder:{root}",
             "bogus": 2}, "bogus"),
           ({"kind": "retrieval_shards"}, "needs shards"),
           ({"kind": "retrieval_shards", "shards": str(tmp_path / "none-*.tar")}, "no shard matches")]
  for cfg, msg in cases:
    with pytest.raises(UserError, match=msg) as e:
      micro["evaluators"]({"e": cfg})
    assert "\n" not in str(e.value)


def test_imagenet_suite_config_builds():
  from tests import train_helpers as th
  c = th.load_config("configs/eval/imagenet.py", None)
  assert c.name == "imagenet"
  assert {e["kind"] for e in c.evals.values()} <= set(KINDS)
  assert c.evals.zeroshot.dataset == "tfds:imagenet2012:validation"
  assert c.evals.zeroshot.templates == "clip_imagenet"
