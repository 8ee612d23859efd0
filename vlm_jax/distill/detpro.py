"""DetPro: learned prompts for ViLD's text classifier (Du et al. 2022, "Learning to Prompt for Open-Vocabulary Object
Detection with Vision-Language Model", CVPR, arXiv 2203.14940).

What is learned: continuous context vectors V = [v_1 … v_M] ∈ R^{M×D} (CoOp-style, Zhou et al. 2022; shared by
all classes, D = the teacher text tower's width). The teacher stays frozen; with g its text encoder the class
embedding of class c is

    t_c(V) = normalise( g([v_1] … [v_M] [CLASS_c] .) )           (`embedding.context_prompts`: placeholders + splice)

Training data: the teacher's embeddings of the cached class-agnostic proposals r of the training images (ViLD's
region target, `teacher_cache`: e_r = normalise(normalise(f_I(crop_1×(r))) + normalise(f_I(crop_1.5×(r))))) and
the images' base ground truth; no teacher pass over images beyond that cache. With u_r the largest IoU of r with a
base box:

    foreground  u_r ≥ 0.5  (y_r = the class of that box)          background  u_r < 0.5 with every box

and over the base classes C_B, p_c(r; V) = softmax_c( cos(e_r, t_c(V)) / τ ):

    L_fg(r) = −log p_{y_r}(r; V)                                   (cross-entropy over the base classes)
    L_bg(r) = −(1/|C_B|) Σ_{c ∈ C_B} log p_c(r; V)                 (background interpretation: minimal when p(r) is
                                                                    uniform — background matches no base class)
    L = (1/N) Σ_r [ 1_fg(r) L_fg(r) + 1_bg(r) L_bg(r) ]            over a minibatch of N proposals,

a fraction `fg_fraction` of each minibatch foreground (like a detector's RoI sampler; the cached proposals are
mostly background), τ = `temperature` (0: the teacher's own, 1 / its logit scale — CLIP: 0.01).

Context grading: the foreground proposals are split by IoU into bins (the paper: [0.5, 0.6), [0.6, 0.7), …,
[0.9, 1.0]; `bins` = their edges, the first edge is the foreground threshold), with one context V_k per bin;
foreground proposal r trains the context of its bin, L_fg(r; V_{k(r)}), and every background proposal trains all
of them, (1/K) Σ_k L_bg(r; V_k). At use time the K class embeddings are ensembled,

    t_c = normalise( (1/K) Σ_k t_c(V_k) )                                                      (prompt ensemble)

for the whole vocabulary (base and novel names). These replace the hand-crafted prompt ensemble as ViLD's classifier
(`run.distill` → `class_embeddings`; the method only, the closed-set baseline is untouched). One bin
(`bins=(0.5, 1.0)`) is DetPro without grading.

This is a preprocessing stage like the crop cache, not the student's training loop: a small optax loop (Adam,
cosine decay; the paper trains the context with SGD — Adam converges in the few hundred steps used here) over the
cached region embeddings, one jitted `lax.scan` whose minibatches draw foreground and background proposals
uniformly with replacement. Its result (class embeddings, contexts, the loss trace and the accuracy check) is cached in
`<teacher_cache.dir>/detpro/<key>.npz`, the key a hash of the teacher's fingerprint, the data, proposal and crop
cache settings, the vocabulary and every DetPro setting: computed once, reproducible from `seed` (random context
init and minibatches). Context init: the token embeddings of `init` ('a photo of a', so M = its token count when
`n_ctx` is 0), or N(0, init_std²) when `init` is ''. With the phrase init and zero steps, t_c is exactly the
teacher's embedding of "a photo of a {name}." (tests/test_distill_detpro.py).

Measured with the pretrained ResNet fixture as teacher (base-class top-1 of the learned vs the hand-crafted prompt
ensemble on the training foreground crops, in-sample; chance 1/32): micro (64 images × 8 random proposals, 16
foreground) 200 steps 0.938 vs 0.750; tiny-sized data with random proposals (1024 images × 24, 731 foreground)
1000 steps 0.785 vs 0.778 in about a minute on 2 shared CPU cores — after 300 steps 0.735, and with one bin
instead of five 0.666 (the background term dominates the early steps).

Config (`config.method.detpro`): enabled, n_ctx, init, init_std, bins, steps, lr, batch_size, fg_fraction,
temperature τ, seed.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.errors import UserError

VERSION = 1  # bump when the cached content changes meaning


# ---- settings and labels --------------------------------------------------------------------------------------

def settings(cfg) -> dict:
  """The checked DetPro settings of `config.method.detpro` (a `UserError` names the bad key)."""
  d = dict(cfg or {})
  s = {"n_ctx": int(d.get("n_ctx", 0) or 0), "init": str(d.get("init", "a photo of a") or ""),
       "init_std": float(d.get("init_std", 0.02)), "bins": tuple(float(b) for b in d.get("bins", (0.5, 1.0))),
       "steps": int(d.get("steps", 200)), "lr": float(d.get("lr", 1e-2)), "batch_size": int(d.get("batch_size", 256)),
       "temperature": float(d.get("temperature", 0.0)), "fg_fraction": float(d.get("fg_fraction", 0.5)),
       "seed": int(d.get("seed", 0))}
  b = s["bins"]
  if len(b) < 2 or not all(lo < hi for lo, hi in zip(b, b[1:])) or not 0 < b[0] or b[-1] > 1:
    raise UserError(f"method.detpro.bins must be increasing IoU edges in (0, 1] (e.g. 0.5,1.0), got {b}")
  if s["steps"] < 0 or s["batch_size"] < 2 or s["temperature"] < 0 or s["lr"] < 0 or not 0 < s["fg_fraction"] < 1:
    raise UserError("method.detpro needs steps >= 0, batch_size >= 2, temperature >= 0 (0: the teacher's), lr >= 0 "
                    "and fg_fraction in (0, 1)")
  if not s["init"] and s["n_ctx"] < 1:
    raise UserError("method.detpro.n_ctx must be >= 1 with a random context init (init='')")
  return s


def check(config) -> dict:
  """The DetPro settings of a run config with DetPro enabled; also a `UserError` when the run caches no crop
  embeddings to learn from (ViLD-image off and no crop-scored pseudo boxes: `proposals.crops_needed`).
  Called by `preflight.distill` and `class_embeddings`."""
  from vlm_jax.distill import proposals  # noqa: PLC0415
  s = settings(config.method.get("detpro"))
  if not proposals.crops_needed(config):
    raise UserError("method.detpro learns from the teacher's crop cache: set method.image_weight > 0 (ViLD-image)")
  return s


def assign(proposals: np.ndarray, gt_boxes: np.ndarray, gt_classes: np.ndarray, base: np.ndarray,
           bins) -> tuple[np.ndarray, np.ndarray]:
  """Foreground / background labels of proposals [N, P, 4] against ground truth [N, K, 4] with vocabulary classes
  [N, K] (−1 padding; only classes where `base` [C] is True count): (label [N, P] = the class of the best-overlapping
  base box when its IoU ≥ bins[0], else −1 (background); bin [N, P] = k with bins[k] ≤ IoU < bins[k+1], the last
  bin also taking IoU ≥ its upper edge, −1 for background)."""
  from vlm_jax.models.detection import boxes as box_ops  # noqa: PLC0415
  edges = np.asarray(bins, np.float32)
  cls = np.asarray(gt_classes)
  valid = (cls >= 0) & np.asarray(base, bool)[np.maximum(cls, 0)]
  iou = np.asarray(box_ops.box_iou(np.asarray(proposals, np.float32), np.asarray(gt_boxes, np.float32)))
  iou = np.where(valid[:, None, :], iou, -1.0)  # [N, P, K]
  best = iou.argmax(-1)
  u = np.take_along_axis(iou, best[..., None], -1)[..., 0]
  fg = u >= edges[0]
  label = np.where(fg, np.take_along_axis(cls, best, -1), -1).astype(np.int32)
  k = np.clip(np.searchsorted(edges, u, side="right") - 1, 0, len(edges) - 2)
  return label, np.where(fg, k, -1).astype(np.int32)


def regions(crops: np.ndarray, proposals: np.ndarray, source, base: np.ndarray, bins) -> dict:
  """The training regions of the cached crops [N, P, S, E] of proposals [N, P, 4] of `source`'s images:
  {'emb' [R, E] (e_r), 'label' [R] (vocabulary class or −1), 'bin' [R]}, R = N·P."""
  from vlm_jax.distill import vild  # noqa: PLC0415
  n = len(crops)
  gts = [source[i] for i in range(n)]
  kmax = max(1, max(len(g["classes"]) for g in gts))
  boxes = np.zeros((n, kmax, 4), np.float32)
  classes = np.full((n, kmax), -1, np.int32)
  for i, g in enumerate(gts):
    boxes[i, :len(g["classes"])], classes[i, :len(g["classes"])] = g["boxes"], g["classes"]
  label, k = assign(proposals, boxes, classes, base, bins)
  emb = np.asarray(vild.teacher_targets(jnp.asarray(crops, jnp.float32)))
  return {"emb": emb.reshape(-1, emb.shape[-1]), "label": label.reshape(-1), "bin": k.reshape(-1)}


# ---- the loss -------------------------------------------------------------------------------------------------

def prompt_loss(class_feats: jax.Array, emb: jax.Array, label: jax.Array, bin_: jax.Array, weight: jax.Array, *,
                temperature: float):
  """L (module docstring) and its parts: class_feats [K, C_B, E] (normalised t_c(V_k)), region embeddings
  emb [B, E], label [B] (index into the C_B base classes, −1 background), bin_ [B] (context of a foreground
  region), weight [B]. Returns (loss, {'fg_loss', 'bg_loss', 'fg_accuracy'}) (accuracy of the region's own
  context)."""
  e = emb.astype(jnp.float32)
  e = e * jax.lax.rsqrt(jnp.maximum(jnp.sum(e * e, -1, keepdims=True), 1e-12))
  logp = jax.nn.log_softmax(jnp.einsum("be,kce->bkc", e, class_feats) / temperature, axis=-1)  # [B, K, C_B]
  own = jnp.take_along_axis(logp, jnp.maximum(bin_, 0)[:, None, None], axis=1)[:, 0]           # [B, C_B]
  fg_nll = -jnp.take_along_axis(own, jnp.maximum(label, 0)[:, None], axis=1)[:, 0]
  bg_nll = -logp.mean(axis=(1, 2))
  fg = label >= 0
  w = weight.astype(jnp.float32)
  wf, wb = w * fg, w * ~fg
  loss = (jnp.where(fg, fg_nll, bg_nll) * w).sum() / jnp.maximum(w.sum(), 1e-12)
  acc = ((jnp.argmax(own, -1) == label) * wf).sum() / jnp.maximum(wf.sum(), 1.0)
  return loss, {"fg_loss": (fg_nll * wf).sum() / jnp.maximum(wf.sum(), 1.0),
                "bg_loss": (bg_nll * wb).sum() / jnp.maximum(wb.sum(), 1.0), "fg_accuracy": acc}


# ---- prompts through the frozen teacher -----------------------------------------------------------------------

class Prompts:
  """The class prompts 'X … X name.' of `names` for the teacher's frozen text tower: `module` (the teacher's Flax
  model), `arrays()` = (its variables, the prompts' token embeddings [C, L, D], context slots [C, L], EOT [C])."""

  def __init__(self, teacher, names, n_ctx: int):
    from vlm_jax.embedding import context_prompts as cp  # noqa: PLC0415
    self.module, self.variables = teacher.model.model, teacher.model.variables
    text = cp.make_prompt_text(teacher.tokenizer, list(names), n_ctx, "end")
    ids, self.index = text.arrays()
    self.token_emb = self.module.apply(self.variables, ids, method="text_token_embeddings")
    self.eot = self.module.apply(self.variables, ids, method="eot_positions")

  def arrays(self):
    return self.variables, self.token_emb, self.index, self.eot


def features(module, ctx: jax.Array, variables, token_emb: jax.Array, index: jax.Array, eot: jax.Array):
  """Normalised t_c(V_k) [K, C, E] of contexts ctx [K, M, D] through `module`'s frozen text tower
  (`features(prompts.module, ctx, *prompts.arrays())`)."""
  from vlm_jax.embedding import context_prompts as cp  # noqa: PLC0415
  k, (c, length, d) = ctx.shape[0], token_emb.shape
  spliced = jax.vmap(lambda v: cp.splice(token_emb, index, v))(ctx).reshape(k * c, length, d)
  z = module.apply(variables, embeddings=spliced, eot_positions=jnp.tile(eot, k), method="encode_text")
  return z.reshape(k, c, -1)


_features = jax.jit(features, static_argnums=0)  # the Flax module is hashable by its config: one compile per shape


def phrase_context(teacher, phrase: str) -> np.ndarray:
  """The frozen token embeddings [M, D] of `phrase` (its SOT/EOT dropped): CoOp's context init."""
  from vlm_jax.embedding import context_prompts as cp  # noqa: PLC0415
  ids = jnp.asarray([cp.phrase_ids(teacher.tokenizer, phrase)], jnp.int32)
  return np.asarray(teacher.model.model.apply(teacher.model.variables, ids, method="text_token_embeddings")[0],
                    np.float32)


def init_context(teacher, s: dict) -> np.ndarray:
  """The K = len(bins) − 1 initial contexts [K, M, D]: the init phrase's embeddings, or N(0, init_std²)."""
  k = len(s["bins"]) - 1
  if s["init"]:
    phrase = phrase_context(teacher, s["init"])
    if s["n_ctx"] and s["n_ctx"] != len(phrase):
      raise UserError(f"method.detpro.init={s['init']!r} has {len(phrase)} tokens; set method.detpro.n_ctx to "
                      "that (or 0)")
    return np.repeat(phrase[None], k, axis=0)
  d = int(teacher.model.model.txt.width)
  noise = jax.random.normal(jax.random.PRNGKey(s["seed"]), (k, s["n_ctx"], d), jnp.float32)
  return np.asarray(noise * s["init_std"])


def ensemble(prompts: Prompts, ctx) -> np.ndarray:
  """t_c = normalise((1/K) Σ_k t_c(V_k)) [C, E] (the prompt ensemble)."""
  feats = _features(prompts.module, jnp.asarray(ctx, jnp.float32), *prompts.arrays())
  m = np.asarray(feats, np.float32).mean(0)
  return m / np.maximum(np.linalg.norm(m, axis=-1, keepdims=True), 1e-12)


# ---- training -------------------------------------------------------------------------------------------------

def minibatch_counts(s: dict, num_fg: int, num_bg: int) -> tuple[int, int]:
  """(foreground, background) proposals per minibatch: fg_fraction of batch_size foreground (at least one of each
  kind when both exist), like a detector's RoI sampler."""
  b = s["batch_size"]
  if num_fg == 0 or num_bg == 0:
    return (b, 0) if num_bg == 0 else (0, b)
  fg = min(max(int(round(s["fg_fraction"] * b)), 1), b - 1)
  return fg, b - fg


@functools.partial(jax.jit, static_argnums=(0, 1))
def _train_scan(module, hp: tuple, variables, token_emb, index, eot, ctx, emb, label, bin_, fg_rows, bg_rows):
  """The jitted loop of `train`; hp = (steps, lr, τ, seed, foreground / background per minibatch, their pool
  sizes) (static, so a repeated call reuses the compiled loop)."""
  import optax  # noqa: PLC0415
  steps, lr, tau, seed, n_fg, n_bg, top_fg, top_bg = hp
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps))

  def loss_fn(c, idx):
    feats = features(module, c, variables, token_emb, index, eot)
    return prompt_loss(feats, emb[idx], label[idx], bin_[idx], jnp.ones(idx.shape), temperature=tau)[0]

  def step(carry, i):
    c, opt = carry
    kf, kb = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), i))
    idx = jnp.concatenate([fg_rows[jax.random.randint(kf, (n_fg,), 0, top_fg)],
                           bg_rows[jax.random.randint(kb, (n_bg,), 0, top_bg)]])
    loss, g = jax.value_and_grad(loss_fn)(c, idx)
    updates, opt = tx.update(g, opt, c)
    return (optax.apply_updates(c, updates), opt), loss

  (ctx, _), losses = jax.lax.scan(step, (ctx, tx.init(ctx)), jnp.arange(steps))
  return ctx, losses


def train(prompts: Prompts, ctx0: np.ndarray, data: dict, s: dict):
  """Adam with cosine decay over `s['steps']` minibatches of `data` ({'emb', 'label' (base index or −1), 'bin'}),
  each `minibatch_counts` foreground and background proposals drawn uniformly with replacement, one jitted
  `lax.scan`; returns (ctx [K, M, D], per-step losses [steps])."""
  if s["steps"] == 0:
    return np.asarray(ctx0), np.zeros((0,), np.float32)
  fg_rows, bg_rows = np.flatnonzero(data["label"] >= 0), np.flatnonzero(data["label"] < 0)
  hp = (s["steps"], s["lr"], s["temperature"], s["seed"], *minibatch_counts(s, len(fg_rows), len(bg_rows)),
        max(len(fg_rows), 1), max(len(bg_rows), 1))
  ctx, losses = _train_scan(prompts.module, hp, *prompts.arrays(), jnp.asarray(ctx0, jnp.float32),
                            jnp.asarray(data["emb"]), jnp.asarray(data["label"]), jnp.asarray(data["bin"]),
                            jnp.asarray(np.append(fg_rows, 0)), jnp.asarray(np.append(bg_rows, 0)))
  return np.asarray(ctx), np.asarray(losses)


def evaluate(prompts: Prompts, ctx, data: dict, s: dict) -> dict:
  """L and its parts on every region of `data`, weighted as the minibatches mix them (`minibatch_counts`): the
  expected minibatch loss."""
  fg = data["label"] >= 0
  n_fg, n_bg = minibatch_counts(s, int(fg.sum()), int((~fg).sum()))
  weight = np.where(fg, n_fg / max(fg.sum(), 1), n_bg / max((~fg).sum(), 1))
  feats = _features(prompts.module, jnp.asarray(ctx, jnp.float32), *prompts.arrays())
  loss, parts = prompt_loss(feats, jnp.asarray(data["emb"]), jnp.asarray(data["label"]), jnp.asarray(data["bin"]),
                            jnp.asarray(weight), temperature=s["temperature"])
  return {"loss": float(loss), **{k: float(v) for k, v in parts.items()}}


def region_accuracy(class_emb: np.ndarray, data: dict) -> float:
  """Top-1 accuracy of argmax_c cos(e_r, t_c) (c over the rows of `class_emb`, the base classes) on the foreground
  regions of `data`."""
  fg = data["label"] >= 0
  if not fg.any():
    return float("nan")
  return float(np.mean(np.argmax(data["emb"][fg] @ np.asarray(class_emb).T, -1) == data["label"][fg]))


# ---- the run's entry ------------------------------------------------------------------------------------------

def cache_path(config, teacher, names, base: np.ndarray, cached: dict, s: dict) -> str:
  from vlm_jax import config_lib  # noqa: PLC0415
  from vlm_jax.distill import data as data_lib  # noqa: PLC0415
  from vlm_jax.distill import teacher_cache  # noqa: PLC0415
  crops = cached.get("crops_cache")
  key = teacher_cache.cache_key({
      "what": "detpro", "detpro_version": VERSION, "teacher": teacher.fingerprint,
      "data": data_lib.settings(config.data), "proposals": config_lib.plain(config.get("proposals")),
      "crops": getattr(crops, "key", None), "names": list(names), "base": np.asarray(base, bool).tolist(),
      "detpro": s})
  root = config.teacher_cache.get("dir") or teacher_cache.default_root()
  return os.path.join(os.path.abspath(root), "detpro", f"{key}.npz")


def training_data(crops: np.ndarray, proposals: np.ndarray, source, base: np.ndarray, bins) -> dict:
  """`regions` with labels as indices into the base classes (the columns of the training classifier)."""
  base = np.asarray(base, bool)
  base_idx = np.flatnonzero(base)
  if not len(base_idx):
    raise UserError("method.detpro needs base classes to learn its prompts from")
  data = regions(crops, proposals, source, base, bins)
  position = np.full(len(base), -1, np.int32)
  position[base_idx] = np.arange(len(base_idx))
  data["label"] = np.where(data["label"] >= 0, position[np.maximum(data["label"], 0)], -1).astype(np.int32)
  if not (data["label"] >= 0).any():
    raise UserError(f"method.detpro: no cached proposal overlaps a base box with IoU >= {bins[0]}")
  return data


def learn(teacher, names, base: np.ndarray, crops: np.ndarray, proposals: np.ndarray, source, s: dict,
          handcrafted: np.ndarray | None = None) -> dict:
  """Trains the DetPro contexts on the cached crops and returns {'class_embeddings' [C, E] (all of `names`),
  'context' [K, M, D], 'losses' [steps], 'loss_start', 'loss_end', 'accuracy_learned', 'accuracy_handcrafted',
  'num_foreground', 'num_background'} (accuracies: base-class top-1 on the foreground regions)."""
  base_idx = np.flatnonzero(np.asarray(base, bool))
  data = training_data(crops, proposals, source, base, s["bins"])
  s = {**s, "temperature": s["temperature"] or 1.0 / float(teacher.model.logit_scale)}
  ctx0 = init_context(teacher, s)
  base_prompts = Prompts(teacher, [names[i] for i in base_idx], ctx0.shape[1])
  start = evaluate(base_prompts, ctx0, data, s)
  ctx, losses = train(base_prompts, ctx0, data, s)
  end = evaluate(base_prompts, ctx, data, s)
  class_emb = ensemble(Prompts(teacher, names, ctx.shape[1]), ctx)
  hand = float("nan") if handcrafted is None else region_accuracy(np.asarray(handcrafted)[base_idx], data)
  return {"class_embeddings": class_emb.astype(np.float32), "context": ctx.astype(np.float32),
          "losses": losses.astype(np.float32), "loss_start": start["loss"], "loss_end": end["loss"],
          "accuracy_learned": region_accuracy(class_emb[base_idx], data), "accuracy_handcrafted": hand,
          "num_foreground": int((data["label"] >= 0).sum()), "num_background": int((data["label"] < 0).sum()),
          "num_base": len(base_idx)}


def class_embeddings(config, teacher, source, cached: dict, *, handcrafted: np.ndarray | None = None,
                     quiet: bool = False) -> np.ndarray:
  """DetPro's class embeddings [C, E] of `source.names` for ViLD's classifier, from the on-disk cache (trained on a
  miss). `cached` is `run.teacher_outputs(…)` ('proposals', 'crops'); base classes = the trained, non-novel ones."""
  s = check(config)
  if "crops" not in cached:
    raise UserError("method.detpro learns from the teacher's crop cache, which this run did not compute")
  names = list(source.names)
  base = ~np.asarray(source.novel, bool) & np.asarray(source.test_mask, bool)
  path = cache_path(config, teacher, names, base, cached, s)
  if not os.path.exists(path):
    out = learn(teacher, names, base, cached["crops"], cached["proposals"], source, s, handcrafted)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path[:-4] + f".tmp{os.getpid()}.npz"
    np.savez(tmp, **{k: np.asarray(v) for k, v in out.items()})
    os.replace(tmp, path)
  elif not quiet:
    print(f"detpro: cached prompts {path}", flush=True)
  with np.load(path) as z:
    out = {k: z[k] for k in z.files}
  if not quiet:
    print(f"detpro: {s['steps']} steps on {int(out['num_foreground'])} foreground / {int(out['num_background'])} "
          f"background proposals; prompt loss {float(out['loss_start']):.4f} -> {float(out['loss_end']):.4f}; "
          f"base-class accuracy on foreground crops: learned {float(out['accuracy_learned']):.3f}, hand-crafted "
          f"{float(out['accuracy_handcrafted']):.3f} (chance {1 / int(out['num_base']):.3f})", flush=True)
  return out["class_embeddings"]
