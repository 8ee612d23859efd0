"""Contrastive objectives over the global batch: CLIP, SigLIP, UniCL and SimCLR (SLIP) losses.

Notation (as in the VLM survey): a global batch of B pairs, z^I_i and z^T_i the L2-normalised image and text
embeddings of pair i, τ the temperature and t = 1/τ the learned logit scale, b the SigLIP logit bias. Every
objective has the signature `loss_fn(outputs, batch, *, mesh_axes=None, **hparams) -> (scalar, metrics)` and
computes in float32 whatever the input dtype (matmuls at `Precision.HIGHEST`, so TPUs do not round the
similarities to bf16 before they are multiplied by t ≤ 100); log-softmax and log-sigmoid are the numerically
stable `jax.nn` forms.

Negatives and sharding. Under GSPMD the embeddings are global, batch-sharded `jax.Array`s, so the dense B×B
formulation below already takes its negatives from the whole global batch. With `mesh_axes` (the batch axes,
e.g. `('data', 'fsdp')`) every B×B matrix is constrained to rows sharded over those axes,
`PartitionSpec(mesh_axes, None)`, so a device holds B/n × B and never the full B×B logits; column-wise
(text-to-image) reductions become all-reduces of length-B vectors. The constraint is a bare `PartitionSpec`,
which needs an ambient mesh while the step is traced: in jax 0.10 that is `jax.set_mesh(mesh)`, used either as
a context manager around the call of the jitted step (`with jax.set_mesh(mesh): step(state, batch)`) or as a
global setter; `jax.sharding.use_mesh` no longer exists in this version. Without an ambient mesh a `ValueError`
says so rather than silently gathering the logits. Per-device memory is still O(B²/n); the ring version that is
linear in B is a separate function.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vlm_jax.errors import UserError

Metrics = dict[str, jax.Array]
_HIGHEST = jax.lax.Precision.HIGHEST


def _f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _normalise_axes(mesh_axes: str | Sequence[str] | None) -> tuple[str, ...] | None:
  if mesh_axes is None:
    return None
  return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def constrain_rows(x: jax.Array, mesh_axes: str | Sequence[str] | None) -> jax.Array:
  """Shards the leading axis of `x` over `mesh_axes` (others replicated); identity when `mesh_axes` is None.

  Needs the ambient mesh set by `jax.set_mesh(mesh)` (see the module docstring).
  """
  axes = _normalise_axes(mesh_axes)
  if axes is None:
    return x
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    raise ValueError(f"mesh_axes={axes} needs an ambient mesh: call the jitted function inside "
                     "`with jax.set_mesh(mesh):` (or set it globally with `jax.set_mesh(mesh)`)")
  missing = [a for a in axes if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"mesh_axes {missing} are not axes of the ambient mesh {mesh.axis_names}")
  return jax.lax.with_sharding_constraint(x, P(axes, *([None] * (x.ndim - 1))))


def similarity_logits(za: jax.Array, zb: jax.Array, scale, *,
                      mesh_axes: str | Sequence[str] | None = None) -> jax.Array:
  """float32 logits `scale · za zbᵀ` [A, B], rows sharded over `mesh_axes` when given."""
  logits = _f32(scale) * jnp.matmul(_f32(za), _f32(zb).T, precision=_HIGHEST)
  return constrain_rows(logits, mesh_axes)


def _multi_positive_ce(logits: jax.Array, positive: jax.Array, axis: int) -> jax.Array:
  """Per anchor: −(1/|P|) Σ_{k∈P} log softmax(logits)_k, the softmax and P taken along `axis`."""
  logp = jax.nn.log_softmax(logits, axis=axis)
  n_pos = jnp.sum(positive, axis=axis, dtype=jnp.float32)
  return -jnp.sum(jnp.where(positive, logp, 0.0), axis=axis) / n_pos


def _top1_is_positive(logits: jax.Array, positive: jax.Array, axis: int) -> jax.Array:
  """Fraction of anchors whose highest logit along `axis` is one of their positives."""
  logits = jax.lax.stop_gradient(logits)
  best = jnp.max(logits, axis=axis)
  best_positive = jnp.max(jnp.where(positive, logits, -jnp.inf), axis=axis)
  return jnp.mean((best_positive >= best).astype(jnp.float32))


def _diagonal_mask(n: int, mesh_axes) -> jax.Array:
  rows = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
  return constrain_rows(rows == cols, mesh_axes)


def _label_contrastive(name: str, zimg, ztxt, scale, labels, mesh_axes) -> tuple[jax.Array, Metrics]:
  """Symmetric image-text contrastive loss whose positives are the pairs sharing a label (shared by CLIP/UniCL)."""
  logits = similarity_logits(zimg, ztxt, scale, mesh_axes=mesh_axes)
  positive = constrain_rows(labels[:, None] == labels[None, :], mesh_axes)
  loss_i2t = jnp.mean(_multi_positive_ce(logits, positive, axis=1))
  loss_t2i = jnp.mean(_multi_positive_ce(logits, positive, axis=0))
  loss = 0.5 * (loss_i2t + loss_t2i)
  metrics = {
      f"{name}/loss": loss,
      f"{name}/i2t_accuracy": _top1_is_positive(logits, positive, axis=1),
      f"{name}/t2i_accuracy": _top1_is_positive(logits, positive, axis=0),
      f"{name}/logit_scale": jax.lax.stop_gradient(_f32(scale)),
  }
  return loss, metrics


def clip_loss(outputs: Mapping[str, Any], batch: Mapping[str, Any], *,
              mesh_axes: str | Sequence[str] | None = None) -> tuple[jax.Array, Metrics]:
  """Symmetric InfoNCE of CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural
  Language Supervision").

    logits_ij = t · z^I_i · z^T_j        (t = 1/τ = outputs['logit_scale'])
    L = ½ [ −(1/B) Σ_i log softmax_j(logits)_ii  −(1/B) Σ_j log softmax_i(logits)_jj ]
      = ½ [ CE(logits, diag) + CE(logitsᵀ, diag) ]

  The image-to-text term normalises each row, the text-to-image term each column. Uses outputs 'zimg',
  'ztxt' [B, D] and 'logit_scale'; `batch` is unused. Metrics: 'clip/loss', 'clip/i2t_accuracy',
  'clip/t2i_accuracy' (top-1 retrieval of the paired item within the global batch), 'clip/logit_scale'.
  """
  del batch
  zimg, ztxt = _f32(outputs["zimg"]), _f32(outputs["ztxt"])
  pair_ids = jnp.arange(zimg.shape[0], dtype=jnp.int32)
  return _label_contrastive("clip", zimg, ztxt, outputs["logit_scale"], pair_ids, mesh_axes)


def unicl_loss(outputs: Mapping[str, Any], batch: Mapping[str, Any], *,
               mesh_axes: str | Sequence[str] | None = None) -> tuple[jax.Array, Metrics]:
  """Image-text-label contrastive loss of UniCL (Yang et al. 2022, "Unified Contrastive Learning in
  Image-Text-Label Space").

  Every pair carries a label y_i (batch['label']); positives of anchor i are P(i) = {k : y_k = y_i}:

    logits_ik = t · z^I_i · z^T_k
    L_i2t = −(1/B) Σ_i (1/|P(i)|) Σ_{k∈P(i)} log softmax_k(logits_i·)_k
    L_t2i = −(1/B) Σ_j (1/|P(j)|) Σ_{k∈P(j)} log softmax_k(logits_·j)_k
    L = ½ (L_i2t + L_t2i)

  With all labels distinct P(i) = {i} and L equals `clip_loss` exactly (image-text data are the special case
  where every caption is its own class). Metrics 'unicl/…' as for CLIP; accuracy counts a hit when the top
  logit is any positive.
  """
  if "label" not in batch:
    raise UserError("the 'unicl' objective needs batch['label'] (class/concept ids); "
                    "use a dataset with labels or the 'clip' objective")
  zimg, ztxt = _f32(outputs["zimg"]), _f32(outputs["ztxt"])
  labels = jnp.asarray(batch["label"]).astype(jnp.int32).reshape(-1)
  return _label_contrastive("unicl", zimg, ztxt, outputs["logit_scale"], labels, mesh_axes)


def siglip_loss(outputs: Mapping[str, Any], batch: Mapping[str, Any], *,
                mesh_axes: str | Sequence[str] | None = None) -> tuple[jax.Array, Metrics]:
  """Pairwise sigmoid loss of SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training").

    logits_ij = t · z^I_i · z^T_j + b,   z_ij = +1 if i = j else −1
    L = −(1/B) Σ_i Σ_j log σ(z_ij · logits_ij)

  normalised by the batch size B as in the paper (not by B²). t = outputs['logit_scale'] and
  b = outputs['logit_bias'] (paper init t = 10, b = −10); a model without a bias uses b = 0. Metrics:
  'siglip/loss', 'siglip/i2t_accuracy', 'siglip/t2i_accuracy', 'siglip/logit_scale', 'siglip/logit_bias'.
  """
  del batch
  zimg, ztxt = _f32(outputs["zimg"]), _f32(outputs["ztxt"])
  scale = _f32(outputs["logit_scale"])
  bias = _f32(outputs.get("logit_bias", 0.0))
  n = zimg.shape[0]
  logits = similarity_logits(zimg, ztxt, scale, mesh_axes=mesh_axes) + bias
  positive = _diagonal_mask(n, mesh_axes)
  signs = jnp.where(positive, 1.0, -1.0)
  loss = -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / n
  metrics = {
      "siglip/loss": loss,
      "siglip/i2t_accuracy": _top1_is_positive(logits, positive, axis=1),
      "siglip/t2i_accuracy": _top1_is_positive(logits, positive, axis=0),
      "siglip/logit_scale": jax.lax.stop_gradient(scale),
      "siglip/logit_bias": jax.lax.stop_gradient(bias),
  }
  return loss, metrics


def simclr_loss(outputs: Mapping[str, Any], batch: Mapping[str, Any], *,
                mesh_axes: str | Sequence[str] | None = None,
                temperature: float = 0.1) -> tuple[jax.Array, Metrics]:
  """NT-Xent over two augmented views (Chen et al. 2020, "A Simple Framework for Contrastive Learning of
  Visual Representations"), the image-only term of SLIP (Mu et al. 2022, "SLIP: Self-supervision meets
  Language-Image Pre-training").

  With u_1..u_B = outputs['zview1'] and u_{B+1}..u_{2B} = outputs['zview2'] (unit vectors) and the positive of
  anchor a being the other view of the same image, p(a) = (a + B) mod 2B:

    s_ak = u_a · u_k / τ,   s_aa = −∞   (self-similarity masked out)
    L = −(1/2B) Σ_{a=1}^{2B} log softmax_k(s_a·)_{p(a)}

  so each anchor sees 2B − 2 negatives from the global batch. τ = `temperature` (SLIP: 0.1). Metrics:
  'simclr/loss', 'simclr/accuracy' (the other view ranked first).
  """
  del batch
  if "zview1" not in outputs or "zview2" not in outputs:
    raise UserError("the 'simclr' objective needs model outputs 'zview1'/'zview2': set model.simclr_head "
                    "and provide batch['image_view1'] and batch['image_view2']")
  views = jnp.concatenate([_f32(outputs["zview1"]), _f32(outputs["zview2"])], axis=0)
  n = views.shape[0]
  sim = similarity_logits(views, views, 1.0 / temperature, mesh_axes=mesh_axes)
  rows = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
  sim = jnp.where(constrain_rows(rows == cols, mesh_axes), -jnp.inf, sim)
  positive = constrain_rows(cols == (rows + n // 2) % n, mesh_axes)
  loss = jnp.mean(_multi_positive_ce(sim, positive, axis=1))
  metrics = {
      "simclr/loss": loss,
      "simclr/accuracy": _top1_is_positive(sim, positive, axis=1),
  }
  return loss, metrics
