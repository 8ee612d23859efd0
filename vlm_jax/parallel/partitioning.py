"""Logical axis names -> mesh axes.

Parameters are created with `nn.with_logical_partitioning(init, (names…))` and activations are constrained with
`nn.with_logical_constraint(x, (names…))` at block boundaries. One rules table, taken from the config
(`config.partitioning.rules`, a list of `(logical_name, mesh_axis_or_axes_or_None)`), maps names to the mesh
axes of `vlm_jax.parallel.mesh`. The default table below serves every mesh: an axis of size 1 shards nothing, so
pure data parallelism, FSDP and tensor parallelism differ only in `config.mesh` sizes.

Parameter names: `embed` (model width), `mlp` (MLP hidden), `heads`, `kv` (per-head dim), `vocab`, `patch`
(flattened patch pixels), `conv_in`/`conv_out` (conv channels), `layers` (scanned layer stack), `norm`.
Activation names: `act_batch`, `act_len`, `act_embed`, `act_mlp`, `act_heads`, `act_kv`.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, Any]]

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("vocab", "model"),
    ("patch", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("layers", None),
    ("norm", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_mlp", "model"),
    ("act_heads", "model"),
    ("act_kv", None),
)


def rules_from_config(rules) -> tuple[tuple[str, Any], ...]:
  """Normalises a config rules list (lists from JSON become tuples) to flax's format."""
  if rules is None:
    return DEFAULT_RULES
  out = []
  for name, axes in rules:
    if isinstance(axes, list):
      axes = tuple(axes)
    out.append((str(name), axes))
  return tuple(out)


def logical_to_shardings(abstract_tree, mesh: Mesh, rules: Rules):
  """NamedShardings for a (possibly abstract) variable tree annotated with logical names.

  Leaves without annotations are replicated.
  """
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, tuple(rules))


def unbox(tree):
  """Strips `nn.LogicallyPartitioned` boxes, leaving plain arrays."""
  return nn.meta.unbox(tree)


def shard_like(tree, shardings):
  """`jax.device_put` of a tree onto matching shardings."""
  return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def replicated_tree(tree, mesh: Mesh):
  return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)
