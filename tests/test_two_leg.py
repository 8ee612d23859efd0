"""Two-leg (FLAVA / ALBEF) model: outputs and masks, config errors, sharded vs single-device equality of every
loss, ITM learning beyond chance on a toy matching task, and the ITM re-ranking evaluator."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlm_jax.errors import UserError
from vlm_jax.evaluate import itm_rerank
from vlm_jax.models import build_model
from vlm_jax.models.patches import patchify, pixel_targets
from vlm_jax.objectives import make_loss_fn
from vlm_jax.parallel.mesh import batch_sharding, make_mesh, replicated

V, L, S = 12, 6, 8       # vocabulary (EOT = 11, [MASK] = 12), text length, image side (patch 4: 4 patches)
CLASSES = 8
COLOURS = np.random.default_rng(42).uniform(-1.5, 1.5, (CLASSES, 2, 3)).astype(np.float32)


def _config(fusion: str = "merged", tasks=("itm", "mlm", "mim", "mcm"), **kw) -> dict:
  return {"framework": "two_leg",
          "image": {"kind": "vit", "variant": "mu/4", "image_size": S, "pool_type": "cls"},
          "text": {"kind": "text", "variant": "tiny", "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64,
                   "vocab_size": V, "max_len": L},
          "fusion": {"kind": fusion, "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64},
          "tasks": tasks, "embed_dim": 16, "decoder": {"width": 16, "depth": 1, "num_heads": 2}, **kw}


def _toy(n: int, seed: int) -> tuple[dict, np.ndarray]:
  """Images whose top/bottom halves have their class's two colours; captions [SOT, w_c, w_c', EOT, pad, pad]
  with word ids 3 + c (c < 8) and a second word naming the class parity."""
  rng = np.random.default_rng(seed)
  c = rng.integers(0, CLASSES, n)
  img = np.concatenate([np.broadcast_to(COLOURS[c, 0, None, None], (n, S // 2, S, 3)),
                        np.broadcast_to(COLOURS[c, 1, None, None], (n, S // 2, S, 3))], axis=1)
  img = img + 0.3 * rng.normal(size=img.shape)
  ids = np.zeros((n, L), np.int32)
  ids[:, 0], ids[:, 1], ids[:, 2], ids[:, 3] = 2, 3 + c, 1 + 9 * (c % 2), V - 1
  return {"image": img.astype(np.float32), "text": ids}, c


def _init(model, batch):
  k = jax.random.PRNGKey(0)
  return nn.meta.unbox(model.init({"params": k, "dropout": k, "mask": k}, batch, train=False))


def test_outputs_shapes_and_config_errors():
  batch, _ = _toy(4, 0)
  model = build_model(_config())
  shapes = jax.eval_shape(lambda: model.apply(_init(model, batch), batch, train=True,
                                              rngs={"mask": jax.random.PRNGKey(1)}))
  assert shapes["itm"]["logits"].shape == (12, 2) and shapes["itm"]["labels"].shape == (12,)
  assert shapes["mlm"]["logits"].shape == (4, L, V) and shapes["mlm"]["mask"].shape == (4, L)
  assert shapes["mim"]["pred"].shape == shapes["mim"]["target"].shape == (4, 4, 48)
  assert shapes["mcm"]["image"]["pred"].shape == (4, 4, 48) and shapes["mcm"]["text"]["logits"].shape == (4, L, V)
  assert shapes["zimg"].shape == shapes["ztxt"].shape == (4, 16)
  params = jax.eval_shape(lambda: _init(model, batch))["params"]
  assert params["txt"]["token_embedding"]["embedding"].shape == (V + 1, 32)  # the extra [MASK] row
  cross = build_model(_config("cross", ("itm", "mlm"), mlm_fused=True))
  out = jax.eval_shape(lambda: cross.apply(_init(cross, batch), batch, train=True, rngs={"mask": jax.random.PRNGKey(1)}))
  assert set(out) >= {"itm", "mlm"} and "mim" not in out
  with pytest.raises(UserError, match="merged"):
    jax.eval_shape(lambda: _init(build_model(_config("cross", ("mcm",))), batch))
  resnet = dict(_config(tasks=("mim",)), image={"kind": "resnet", "variant": "tiny", "image_size": 32})
  with pytest.raises(UserError, match="ViT"):
    jax.eval_shape(lambda: _init(build_model(resnet), {"image": np.zeros((2, 32, 32, 3), np.float32),
                                                        "text": batch["text"][:2]}))
  for bad, match in (({"tasks": ("itm", "bogus")}, "bogus"), ({"fusion": {"kind": "sum"}}, "fusion kind"),
                     ({"colour": 1}, "colour")):
    with pytest.raises(UserError, match=match):
      jax.eval_shape(lambda b=bad: _init(build_model({**_config(), **b}), batch))


def test_patch_targets():
  x = np.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
  p = np.asarray(patchify(jnp.asarray(x), 4))
  np.testing.assert_array_equal(p[1, 1].reshape(4, 4, 3), x[1, 0:4, 4:8])  # row-major grid: patch 1 = top right
  t = np.asarray(pixel_targets(jnp.asarray(x), 4))  # MAE's norm_pix target: variance with ddof 1
  np.testing.assert_allclose(t.mean(-1), 0, atol=1e-4)
  np.testing.assert_allclose(t.std(-1, ddof=1), 1, atol=1e-3)
  with pytest.raises(UserError, match="multiple of the patch size"):  # no silent crop
    pixel_targets(jnp.zeros((1, 9, 8, 3)), 4)


def test_sharded_matches_single_device_and_masks():
  """Every loss (clip, itm with its in-graph mining, mlm, mae on 'mim', mcm) equal on 1 and 8 devices."""
  batch, _ = _toy(16, 1)
  model = build_model(_config())
  variables = _init(model, batch)
  loss_fn = make_loss_fn({"clip": 1.0, "itm": 1.0, "mlm": 1.0, "mae": 1.0, "mcm": 1.0})

  def f(v, b):
    out = model.apply(v, b, train=True, rngs={"mask": jax.random.PRNGKey(7), "dropout": jax.random.PRNGKey(8)})
    return loss_fn(out, b)[1], out["mlm"]["mask"], out["mim"]["mask"], out["itm"]["labels"]

  metrics, mlm_mask, mim_mask, labels = jax.jit(f)(variables, batch)
  mesh = make_mesh({"data": 2, "fsdp": 4})
  placed = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
  with jax.set_mesh(mesh):
    sharded = jax.jit(f, out_shardings=replicated(mesh))(jax.device_put(variables, replicated(mesh)), placed)
  for k in metrics:
    np.testing.assert_allclose(float(metrics[k]), float(sharded[0][k]), rtol=2e-5, atol=1e-6, err_msg=k)
  # MLM: exactly one of the two real tokens (round(0.15·2) -> max(1, 0) = 1) per row carries loss
  mlm_mask = np.asarray(mlm_mask)
  np.testing.assert_array_equal(mlm_mask.sum(1), 1)
  assert not np.any(mlm_mask[:, [0, 3, 4, 5]])
  # MIM/MCM: round(0.4·4) = 2 of the 4 patches are masked per image
  np.testing.assert_array_equal(np.asarray(mim_mask).sum(1), 2)
  np.testing.assert_array_equal(np.asarray(labels), [1] * 16 + [0] * 32)
  assert all(np.isfinite(float(v)) for v in metrics.values())


@pytest.fixture(scope="module")
def trained():
  """An ITM + contrastive micro model (merged fusion) trained for 400 steps on the toy task (~10 s after compile).

  The contrastive weight is 0.1: at equal weights the contrastive gradient dominates the shared encoders early
  and ITM needs several hundred more steps to leave the constant prior."""
  model = build_model(_config("merged", ("itm",)))
  batch, _ = _toy(32, 2)
  variables = _init(model, batch)
  loss_fn = make_loss_fn({"clip": 0.1, "itm": 1.0})
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt, b, k):
    def loss(p):
      return loss_fn(model.apply({"params": p}, b, train=True, rngs={"mask": k, "dropout": k}), b)
    (_, m), g = jax.value_and_grad(loss, has_aux=True)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, m

  params, opt = variables["params"], tx.init(variables["params"])
  for i in range(400):
    b, _ = _toy(32, 100 + i)
    params, opt, m = step(params, opt, b, jax.random.PRNGKey(i))
  return model, {"params": params}, {k: float(v) for k, v in m.items()}


def test_itm_learns_beyond_chance(trained):
  model, variables, last = trained
  batch, c = _toy(128, 9999)
  shift = np.random.default_rng(0).integers(1, CLASSES, 128)
  neg_ids, _ = _toy(128, 9999)
  neg_ids = neg_ids["text"].copy()
  nc = (c + shift) % CLASSES                     # a caption of another class
  neg_ids[:, 1], neg_ids[:, 2] = 3 + nc, 1 + 9 * (nc % 2)
  score = jax.jit(lambda v, im, t: model.apply(v, im, t, method="itm_score"))
  pos, neg = np.asarray(score(variables, batch["image"], batch["text"])), np.asarray(
      score(variables, batch["image"], neg_ids))
  acc = 0.5 * (np.mean(pos > 0) + np.mean(neg <= 0))
  print(f"ITM balanced accuracy {acc:.3f} (chance 0.500); last training batch {last['itm/balanced_accuracy']:.3f} "
        f"(hard negatives), itm/loss {last['itm/loss']:.3f} (chance ln 2 = 0.693 for balanced classes)")
  assert acc > 0.8


def test_rerank_helper():
  sim = np.array([[0.9, 0.8, 0.1], [0.2, 0.3, 0.4]], np.float32)
  out = itm_rerank.rerank(sim, 2, lambda q, c: np.where(c == 1, 5.0, -5.0))
  # row 0: top-2 {0, 1} re-ordered by ITM (1 first); row 1: top-2 {2, 1}, 1 first; outside the top-k unchanged
  assert np.argsort(-out[0])[0] == 1 and out[0, 2] == pytest.approx(0.1)
  assert list(np.argsort(-out[1])) == [1, 2, 0]


def test_itm_rerank_evaluator(trained):
  model, variables, _ = trained
  batch, c = _toy(32, 777)
  words = [f"w{k}" for k in range(CLASSES)]
  captions = [[f"{words[k]} {'odd' if k % 2 else 'even'}"] for k in c]

  def tokenizer(texts):
    ids = np.zeros((len(texts), L), np.int32)
    for r, t in enumerate(texts):
      w, parity = t.split()
      ids[r, :4] = 2, 3 + words.index(w), 10 if parity == "odd" else 1, V - 1
    return ids

  out = itm_rerank.evaluate(model, variables, tokenizer, batch["image"], captions, top_k=4, batch_size=16)
  print({k: round(v, 3) for k, v in out.items()})
  for k in ("image_to_text_R@1", "text_to_image_R@1", "reranked_image_to_text_R@1", "reranked_text_to_image_R@1",
            "itm_accuracy", "itm_hard_accuracy"):
    assert 0.0 <= out["itm_rerank/" + k] <= 1.0
  assert out["itm_rerank/itm_accuracy"] > 0.8 and out["itm_rerank/top_k"] == 4
  assert out["itm_rerank/chance_text_to_image_R@1"] == pytest.approx(1 / 32)
