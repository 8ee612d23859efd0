"""CLIPSeg (issue 16): the FiLM-conditioned decoder's mask for an (image, query) pair is the same wherever the pair
sits in a batch with other images and queries (bit for bit at one batch shape; alone, a differently compiled shape,
to float rounding), and the semantic `segment` logits are those masks (the
background logit logit(θ), classes outside the test set −1e9); the training rows query base classes only."""

from __future__ import annotations

import jax
import numpy as np


def _model():
  from vlm_jax.models.segmentation import clipseg
  image = {"kind": "vit", "variant": "mu/4", "image_size": 16, "pool_type": "gap", "width": 32, "depth": 2,
           "num_heads": 2, "mlp_dim": 64}
  model = clipseg.build({"image": image, "layers": (0, -1), "reduce_dim": 16, "num_heads": 2, "mlp_dim": 32,
                         "embed_dim": 8, "num_classes": 5, "threshold": 0.3})
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(0), {"image": images[:1], "queries": np.zeros((1, 1), np.int32)})
  variables = jax.tree_util.tree_map(np.asarray, variables)
  variables["constants"]["class_embeddings"] = rng.normal(size=(5, 8)).astype(np.float32)
  variables["constants"]["test_mask"] = np.array([True, True, False, True, True])
  return model, variables, images


def test_film_query_equals_itself_across_batch_layouts():
  model, variables, images = _model()
  apply = jax.jit(lambda v, b: model.apply(v, b)["mask_logits"])
  alone = apply(variables, {"image": images[1:2], "queries": np.array([[3]], np.int32)})[0, 0]
  batched = apply(variables, {"image": images, "queries": np.array([[0, 1], [4, 3], [3, 2]], np.int32)})
  moved = apply(variables, {"image": images[[1, 2, 0]], "queries": np.array([[3, 4], [1, 0], [2, 2]], np.int32)})
  diff = float(np.abs(np.asarray(batched[1, 1]) - alone).max())
  print(f"max |alone − in batch| = {diff:.3g} (another compiled shape: float rounding); mask logits range "
        f"{float(alone.min()):.3f}..{float(alone.max()):.3f}")
  # the same batch shape, the pair at another row and column, other images and queries beside it: bit for bit
  np.testing.assert_array_equal(np.asarray(moved[0, 0]), np.asarray(batched[1, 1]))
  np.testing.assert_allclose(np.asarray(batched[1, 1]), np.asarray(alone), rtol=0, atol=1e-5)
  assert not np.allclose(np.asarray(batched[1, 0]), np.asarray(alone))  # another query gives another mask
  seg = np.asarray(jax.jit(lambda v, x: model.apply(v, x, method="segment"))(variables, images))
  assert seg.shape == (3, 16, 16, 6)
  np.testing.assert_allclose(seg[..., 0], np.log(0.3 / 0.7), rtol=1e-6)
  assert np.all(seg[..., 3] == -1e9)  # class 2 is not a test class
  np.testing.assert_allclose(seg[1, ..., 4], np.asarray(alone), rtol=1e-5, atol=1e-5)


def test_training_queries_are_base_classes_with_their_masks():
  from vlm_jax.distill import clipseg
  labels = np.zeros((8, 8), np.int32)
  labels[:2, :2], labels[4:, 4:] = 3, 6  # class 2 (base) and class 5 (novel: unlabelled in training, but here)
  row = clipseg.with_queries(lambda i: {"image": np.zeros((8, 8, 3)), "labels": labels}, np.array([0, 1, 2, 3]),
                             3, seed=0)(0)
  q = row["queries"]
  assert q[0] == 2 and len(set(q.tolist())) == 3 and set(q.tolist()) <= {0, 1, 2, 3}
  np.testing.assert_array_equal(row["targets"][0], labels == 3)
  assert row["targets"][1:].sum() == 0
