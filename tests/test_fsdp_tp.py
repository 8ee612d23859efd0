"""Parameter sharding from the logical rules: FSDP splits parameters and optimizer state over `fsdp`, and
Megatron-style tensor parallelism (Shoeybi et al. 2019) splits attention heads and MLP hidden units over `model`.

Checked on the placed arrays themselves (`addressable_shards`), for a small ViT + text two-tower built with
`create_train_state` on 8 simulated CPU devices.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import traverse_util

from vlm_jax.models import build_model
from vlm_jax.parallel import partitioning
from vlm_jax.parallel.mesh import make_mesh
from vlm_jax import config_lib as config_base
from vlm_jax.train import optim
from vlm_jax.train.state import create_train_state

WIDTH, HEADS, MLP = 64, 4, 256


def _model_config(scan: bool) -> dict:
  return {
      "image": {"kind": "vit", "variant": "S/16", "width": WIDTH, "depth": 2, "num_heads": HEADS,
                "mlp_dim": MLP, "image_size": 32, "pool_type": "cls"},
      "text": {"kind": "text", "variant": "tiny", "width": WIDTH, "depth": 2, "num_heads": HEADS,
               "mlp_dim": MLP, "vocab_size": 64, "max_len": 8},
      "embed_dim": 32, "scan": scan, "remat": "none"}


def _state(mesh_sizes: dict, scan: bool = False):
  mesh = make_mesh(mesh_sizes)
  model = build_model(_model_config(scan))
  tx, _ = optim.make_optimizer(config_base.base_config().optimizer, 10)
  batch = {"image": np.zeros((1, 32, 32, 3), np.float32), "text": np.ones((1, 8), np.int32)}
  with jax.set_mesh(mesh):
    state, _ = create_train_state(model, tx, batch, mesh=mesh, rules=partitioning.DEFAULT_RULES, frozen=None,
                                  rng=jax.random.PRNGKey(0))
  return mesh, state


def _bytes(tree) -> tuple[int, int, int]:
  """(total bytes, bytes on device 0, bytes of fully replicated leaves) over the array leaves of `tree`."""
  leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
  total = sum(x.nbytes for x in leaves)
  per_device = sum(x.addressable_shards[0].data.nbytes for x in leaves)
  replicated = sum(x.nbytes for x in leaves if x.sharding.is_fully_replicated)
  return total, per_device, replicated


@pytest.mark.parametrize("mesh_sizes", [{"fsdp": 8}, {"data": 2, "fsdp": 4}, {"fsdp": 4, "model": 2}])
def test_fsdp_shards_parameters_and_optimizer_state(mesh_sizes):
  mesh, state = _state(mesh_sizes)
  n = mesh.shape["fsdp"]
  for tree in (state.params, state.opt_state):
    total, per_device, replicated = _bytes(tree)
    # every leaf with an `embed` axis is split n ways; only small leaves (norms, biases, scalars) are whole
    assert replicated < 0.05 * total, (replicated, total)
    assert total / (n * mesh.shape["model"]) <= per_device <= total / n + replicated, (per_device, total, n)
  for x in jax.tree.leaves(state.params):  # shards are exactly the sharding's share, no padding or copies
    shard = x.addressable_shards[0].data
    assert shard.nbytes == x.nbytes // int(np.prod([mesh.shape[a] for s in x.sharding.spec if s
                                                    for a in (s if isinstance(s, tuple) else (s,))]))


def _expected_model_axis(path: str, scan: bool) -> int | None:
  """Which kernel axis carries `heads`/`mlp` (sharded over `model`), or None for leaves not checked."""
  lead = 1 if scan else 0
  if path.endswith(("attn/query/kernel", "attn/key/kernel", "attn/value/kernel")):
    return lead + 1   # [embed, heads, kv]
  if path.endswith("attn/out/kernel"):
    return lead       # [heads, kv, embed]
  if path.endswith("mlp/fc1/kernel"):
    return lead + 1   # [embed, mlp]
  if path.endswith("mlp/fc2/kernel"):
    return lead       # [mlp, embed]
  return None


@pytest.mark.parametrize("mesh_sizes,scan", [({"data": 4, "model": 2}, False), ({"fsdp": 4, "model": 2}, True)])
def test_tensor_parallel_splits_heads_and_mlp(mesh_sizes, scan):
  mesh, state = _state(mesh_sizes, scan=scan)
  flat = traverse_util.flatten_dict(state.params, sep="/")
  checked = 0
  for path, x in flat.items():
    axis = _expected_model_axis(path, scan)
    if axis is None:
      continue
    checked += 1
    spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
    assert spec[axis] == "model", (path, spec)
    shard = x.addressable_shards[0].data
    assert shard.shape[axis] == x.shape[axis] // 2, (path, shard.shape, x.shape)
    if mesh.shape["fsdp"] > 1:  # FSDP and TP compose: the embed axis is split too
      assert shard.size == x.size // (2 * mesh.shape["fsdp"]), (path, shard.shape, x.shape)
  assert checked == 2 * 2 * 6 // (2 if scan else 1), checked  # 2 towers x depth 2 (or scanned) x 6 kernels
