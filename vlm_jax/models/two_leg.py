"""Two-leg (fusion) model: image and text encoders plus a fusion encoder, with ITM / MLM / MIM / MCM heads.

The survey's two-leg framework. `fusion='merged'` is FLAVA's multimodal encoder (Singh et al. 2022,
arXiv:2112.04482, §3.1): the projected image tokens and text tokens, each with a modality embedding, are
concatenated behind a learned fusion [CLS] token and one bidirectional transformer runs over all of them.
`fusion='cross'` is ALBEF's (Li et al. 2021, arXiv:2107.07651, §3.1): only the text tokens flow through the fusion
layers, each of which is self-attention, cross-attention to the image tokens, then an MLP; the fused [CLS] is the
text's first position. The contrastive heads keep the two-tower outputs (zimg, ztxt, logit_scale; 'clip' applies
unchanged) from the unimodal [CLS]/pooled features. In training (whenever a 'mask' rng stream is given, also at
init) the model adds, for the tasks listed in `tasks`:

- 'itm': hard negatives mined from the global in-batch similarity (`models.hard_negatives.sample_hard_negatives`),
  the fusion run on the B positives and 2B negatives, outputs['itm'] = {'logits' [3B, 2], 'labels' [3B]}.
- 'mlm': BERT corruption of the text (`models.masking.bert_mask`, with the text tower's SOT/EOT/pad ids from the
  tokenizer; [MASK] = the text embedding's extra
  row `vocab_size`, one beyond the tokenizer's vocabulary), the text encoder re-run on it and an MLM head on its
  tokens (FLAVA's unimodal MLM); `mlm_fused=True` reads the head from the fusion of the corrupted text with the
  intact image instead (ALBEF's MLM). outputs['mlm'] = {'logits' [B, L, V], 'targets', 'mask'}.
- 'mim': the image encoder re-run on the visible patches only (MAE-style dropping, He et al. 2022, rather than
  FLAVA/BEiT's mask-token replacement, so no masked pixel leaks into the encoder), then a light MAE decoder (mask
  tokens + positions, a small transformer) predicts the per-patch normalised pixels (MAE's norm_pix target,
  `models.patches.pixel_targets`: the image sides must be multiples of the patch size).
  outputs['mim'] = {'pred', 'target' [B, N, p·p·3], 'mask' [B, N] (1 = masked)}; consumed by the 'mae' objective.
- 'mcm': FLAVA's masked multimodal modelling — the fusion of the masked image (masked positions filled with a
  learned mask token) and the BERT-corrupted text (the same masks as 'mim' / 'mlm'); heads predict the masked
  patches' normalised pixels (deviation: FLAVA predicts dVAE tokens) and the masked tokens.
  outputs['mcm'] = {'image': {pred, target, mask}, 'text': {logits, targets, mask}} ('merged' fusion only).

Deviation from FLAVA: only the encoders' patch/text tokens enter the merged fusion (not their [CLS] states).
The fusion attends to the text tokens up to and including EOT (`models.tokens.valid_tokens`).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.models import IMAGE_KINDS, TEXT_KINDS, _plain, build_encoder, common_defaults, tokens, variants
from vlm_jax.models.hard_negatives import same_text_pairs, sample_hard_negatives
from vlm_jax.models.masking import bert_mask, masked_from_keep, random_keep_indices
from vlm_jax.models.patches import pixel_targets
from vlm_jax.models.transformer import ACT, Attention, Encoder, Mlp, layer_norm
from vlm_jax.models.two_tower import MAX_LOG_LOGIT_SCALE, l2_normalize

Dtype = Any
TASKS = ("itm", "mlm", "mim", "mcm")
FUSIONS = ("merged", "cross")


def _dense(features: int, axes: tuple, name: str, dtype, param_dtype, init=None) -> nn.Dense:
  return nn.Dense(features, name=name, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=nn.with_logical_partitioning(init or nn.initializers.xavier_uniform(), axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[-1],)))


def scatter_tokens(visible: jax.Array, keep_idx: jax.Array, fill: jax.Array, num: int) -> jax.Array:
  """Places the K visible tokens [B, K, D] at `keep_idx` [B, K] of a [B, num, D] grid filled with `fill` [D]."""
  b, _, d = visible.shape
  grid = jnp.broadcast_to(fill.astype(visible.dtype), (b, num, d))
  return jax.vmap(lambda g, i, v: g.at[i].set(v))(grid, keep_idx, visible)


class CrossBlock(nn.Module):
  """ALBEF fusion layer (Li et al. 2021, §3.1), pre-LN: x += SelfAttn(LN x); x += CrossAttn(LN x, image); x += MLP."""
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, image, mask=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=self.deterministic)  # noqa: E731
    x = x + drop(Attention(self.num_heads, name="self_attn", **kw)(layer_norm(name="ln1", **kw)(x), mask=mask))
    x = nn.with_logical_constraint(x, ACT)
    x = x + drop(Attention(self.num_heads, name="cross_attn", **kw)(layer_norm(name="ln2", **kw)(x), image))
    x = nn.with_logical_constraint(x, ACT)
    x = x + drop(Mlp(self.mlp_dim, dropout=self.dropout, deterministic=self.deterministic, name="mlp", **kw)(
        layer_norm(name="ln3", **kw)(x)))
    return nn.with_logical_constraint(x, ACT)


class Fusion(nn.Module):
  """The fusion encoder: (img [B, N, D], txt [B, L, D], txt_valid bool [B, L]) -> (cls [B, D], img_out, txt_out).

  'merged' (FLAVA): [CLS_m; img + e_img; txt + e_txt] through a bidirectional `Encoder` (padding keys masked);
  img_out [B, N, D]. 'cross' (ALBEF): `CrossBlock`s over the text, cls = position 0, img_out None; its layers
  are unrolled (`scan`/`remat` apply to 'merged'). `width` is the fusion width (the inputs' last axis).
  """
  kind: str = "merged"
  width: int = 64
  depth: int = 2
  num_heads: int = 2
  mlp_dim: int = 256
  dropout: float = 0.0
  scan: bool = False
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, img, txt, txt_valid, *, train: bool = False):
    b, n, d = img.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.kind == "merged":
      init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed"))
      cls = self.param("cls", init, (1, 1, d), self.param_dtype)
      modality = self.param("modality_embedding", init, (2, 1, d), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)),
                           img.astype(self.dtype) + modality[0].astype(self.dtype),
                           txt.astype(self.dtype) + modality[1].astype(self.dtype)], axis=1)
      keys = jnp.concatenate([jnp.ones((b, 1 + n), bool), txt_valid.astype(bool)], axis=1)
      x = Encoder(self.depth, self.num_heads, self.mlp_dim, dropout=self.dropout, scan=self.scan,
                  remat=self.remat, name="encoder", **kw)(x, keys[:, None, None, :], train=train)
      return x[:, 0], x[:, 1:1 + n], x[:, 1 + n:]
    x = txt.astype(self.dtype)
    mask = txt_valid.astype(bool)[:, None, None, :]
    for i in range(self.depth):
      x = CrossBlock(self.num_heads, self.mlp_dim, self.dropout, not train, name=f"block_{i}", **kw)(
          x, img.astype(self.dtype), mask)
    x = layer_norm(name="ln_final", **kw)(x)
    return x[:, 0], None, x


class TokenHead(nn.Module):
  """BERT's MLM head (Devlin et al. 2019): Dense(D) -> GELU -> LayerNorm -> Dense(vocab) (untied)."""
  vocab_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.gelu(_dense(d, ("embed", "mlp"), "transform", self.dtype, self.param_dtype)(x), approximate=False)
    x = layer_norm(self.dtype, self.param_dtype, name="ln")(x)
    return _dense(self.vocab_size, ("mlp", "vocab"), "decoder", self.dtype, self.param_dtype)(x)


class PatchDecoder(nn.Module):
  """MAE's light decoder (He et al. 2022, §3): visible tokens -> Dense(width), mask tokens at the dropped
  positions, learned positions, `depth` pre-LN blocks, Dense(p·p·3) per patch."""
  out_dim: int
  width: int = 64
  depth: int = 1
  num_heads: int = 2
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, visible, keep_idx, num: int, *, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _dense(self.width, ("embed", "mlp"), "embed", **kw)(visible)
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed"))
    mask_token = self.param("mask_token", init, (1, 1, self.width), self.param_dtype)
    pos = self.param("pos_embedding", init, (1, num, self.width), self.param_dtype)
    x = scatter_tokens(x, keep_idx, mask_token[0, 0], num) + pos.astype(x.dtype)
    x = Encoder(self.depth, self.num_heads, 4 * self.width, name="encoder", **kw)(x, train=train)
    return _dense(self.out_dim, ("embed", "patch"), "pred", **kw)(x)


class FusionInput(nn.Module):
  """Projects encoder tokens to the fusion width and adds learned fusion-side positions to the image slots.

  With `keep_idx` (MCM) the K visible image tokens are placed on the full grid of `num` patches and the dropped
  positions get a learned mask token (BEiT/FLAVA's [MASK] patch) before the positions are added.
  """
  width: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, img_tokens, txt_tokens, keep_idx=None, num: int | None = None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _dense(self.width, ("embed", "mlp"), "image", **kw)(img_tokens)
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed"))
    if keep_idx is not None:
      mask_token = self.param("mask_token", init, (1, 1, self.width), self.param_dtype)
      x = scatter_tokens(x, keep_idx, mask_token[0, 0], num)
    pos = self.param("image_pos", init, (1, x.shape[1], self.width), self.param_dtype)
    return x + pos.astype(x.dtype), _dense(self.width, ("embed", "mlp"), "text", **kw)(txt_tokens)


class TwoLeg(nn.Module):
  """FLAVA / ALBEF two-leg model (see the module docstring); `vocab_size` is the tokenizer's (the text
  encoder `txt` has vocab_size + 1 embedding rows, [MASK] = vocab_size)."""
  img: nn.Module
  txt: nn.Module
  fusion: Fusion
  vocab_size: int
  embed_dim: int = 512
  tasks: tuple[str, ...] = ("itm",)
  mlm_ratio: float = 0.15
  mim_ratio: float = 0.4
  mlm_fused: bool = False
  mlm_skip_first: bool = True
  itm_hard_fraction: float = 1.0
  decoder_width: int = 64
  decoder_depth: int = 1
  decoder_heads: int = 2
  logit_scale_init: float = math.log(1 / 0.07)
  max_log_logit_scale: float | None = MAX_LOG_LOGIT_SCALE
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.img_proj = _dense(self.embed_dim, ("embed", None), "img_proj", **kw, init=nn.initializers.lecun_normal())
    self.txt_proj = _dense(self.embed_dim, ("embed", None), "txt_proj", **kw, init=nn.initializers.lecun_normal())
    self.log_logit_scale = self.param("log_logit_scale", nn.initializers.constant(self.logit_scale_init), (),
                                      jnp.float32)
    self.fusion_in = FusionInput(self.fusion.width, **kw)
    self.itm_head = _dense(2, ("embed", None), "itm_head", **kw)
    self.mlm_head = TokenHead(self.vocab_size, **kw)
    self.mcm_text_head = TokenHead(self.vocab_size, **kw)
    pixels = getattr(self.img, "patch_size", 1) ** 2 * 3
    self.mim_decoder = PatchDecoder(pixels, self.decoder_width, self.decoder_depth, self.decoder_heads, **kw)
    self.mcm_image_head = _dense(pixels, ("embed", "patch"), "mcm_image_head", **kw)

  def logit_scale(self):
    """t = exp(min(log_logit_scale, ln 100)) (CLIP's clamp; None: unclamped)."""
    if self.max_log_logit_scale is None:
      return jnp.exp(self.log_logit_scale)
    return jnp.exp(jnp.minimum(self.log_logit_scale, self.max_log_logit_scale))

  def _text(self, ids, *, train: bool, eot_positions=None):
    return self.txt(ids, eot_positions=eot_positions, train=train)

  def _layout(self) -> dict:
    """The text tower's {'sot_id', 'eot_id', 'pad_id'} (the tokenizer's; all None: the old CLIP convention)."""
    return tokens.layout_of(self.txt)

  def _valid(self, ids):
    """bool [B, L]: the text tokens the fusion attends to (up to and including EOT)."""
    layout = self._layout()
    return tokens.valid_tokens(ids, eot_id=layout["eot_id"], pad_id=layout["pad_id"])

  def encode_image(self, images, *, train: bool = False):
    """L2-normalised image embeddings zimg [B, embed_dim] (float32)."""
    return l2_normalize(self.img_proj(self.img(images, train=train)["pooled"]))

  def encode_text(self, ids, *, train: bool = False):
    """L2-normalised text embeddings ztxt [B, embed_dim] (float32) for token ids [B, L]."""
    return l2_normalize(self.txt_proj(self._text(ids, train=train)["pooled"]))

  def _fuse(self, img_tokens, txt_tokens, txt_valid, *, train: bool, keep_idx=None, num_patches=None):
    """(cls, img_out, txt_out) of the fusion encoder over encoder tokens (see `FusionInput` for `keep_idx`)."""
    x_img, x_txt = self.fusion_in(img_tokens, txt_tokens, keep_idx, num_patches)
    return self.fusion(x_img, x_txt, txt_valid, train=train)

  def itm_score(self, images, ids, *, train: bool = False):
    """ITM log-odds log p(match) − log p(no match) [B] of the pairs (images[b], ids[b]) (ALBEF/BLIP re-ranking)."""
    img = self.img(images, train=train)["tokens"]
    cls, _, _ = self._fuse(img, self._text(ids, train=train)["tokens"], self._valid(ids), train=train)
    logits = self.itm_head(cls).astype(jnp.float32)
    return logits[:, 1] - logits[:, 0]

  def _check_tasks(self):
    unknown = sorted(set(self.tasks) - set(TASKS))
    if unknown:
      raise UserError(f"unknown two_leg task(s) {unknown}; valid: {list(TASKS)}")
    if "mcm" in self.tasks and self.fusion.kind != "merged":
      raise UserError("task 'mcm' reconstructs image patches from the fused tokens: it needs fusion 'merged'")
    if {"mim", "mcm"} & set(self.tasks) and not hasattr(self.img, "num_patches"):
      raise UserError("tasks 'mim'/'mcm' mask image patches: they need a ViT image encoder (kind='vit')")

  def __call__(self, batch, *, train: bool = False):
    """batch {'image' [B,H,W,3], 'text' int [B,L]} -> outputs (see the module docstring)."""
    self._check_tasks()
    images, ids = jnp.asarray(batch["image"]), jnp.asarray(batch["text"], jnp.int32)
    img = self.img(images, train=train)
    txt = self._text(ids, train=train)
    zimg = l2_normalize(self.img_proj(img["pooled"]))
    ztxt = l2_normalize(self.txt_proj(txt["pooled"]))
    out = {"zimg": zimg, "ztxt": ztxt, "logit_scale": self.logit_scale(), "img": img, "txt": txt}
    if not self.has_rng("mask"):  # evaluation without a 'mask' stream: the contrastive outputs only
      return out
    valid = self._valid(ids)
    k_itm, k_mlm, k_mim = jax.random.split(self.make_rng("mask"), 3)
    if "itm" in self.tasks:
      out["itm"] = self._itm(k_itm, img["tokens"], txt["tokens"], ids, valid, zimg, ztxt, out["logit_scale"], train)
    if {"mlm", "mcm"} & set(self.tasks):
      layout = self._layout()
      masked_ids, selected = bert_mask(k_mlm, ids, mask_id=self.vocab_size, vocab_size=self.vocab_size,
                                       ratio=self.mlm_ratio, skip_first=self.mlm_skip_first, **layout)
      eot = tokens.eot_positions(ids, layout["eot_id"])  # of the intact row: [MASK] is the largest id
      txt_m = self._text(masked_ids, train=train, eot_positions=eot)["tokens"]
      if "mlm" in self.tasks:
        feats = txt_m
        if self.mlm_fused:
          feats = self._fuse(img["tokens"], txt_m, valid, train=train)[2]
        out["mlm"] = {"logits": self.mlm_head(feats), "targets": ids, "mask": selected.astype(jnp.float32)}
    if {"mim", "mcm"} & set(self.tasks):
      num = self.img.num_patches(images.shape)
      keep_idx = random_keep_indices(k_mim, images.shape[0], num, self.mim_ratio)
      img_m = self.img(images, keep_idx=keep_idx, train=train)["tokens"]
      target = pixel_targets(images, self.img.patch_size)
      mask = masked_from_keep(keep_idx, num)
      if "mim" in self.tasks:
        out["mim"] = {"pred": self.mim_decoder(img_m, keep_idx, num, train=train), "target": target, "mask": mask}
      if "mcm" in self.tasks:
        _, img_f, txt_f = self._fuse(img_m, txt_m, valid, train=train, keep_idx=keep_idx, num_patches=num)
        out["mcm"] = {"image": {"pred": self.mcm_image_head(img_f), "target": target, "mask": mask},
                      "text": {"logits": self.mcm_text_head(txt_f), "targets": ids,
                               "mask": selected.astype(jnp.float32)}}
    return out

  def _itm(self, rng, img_tokens, txt_tokens, ids, valid, zimg, ztxt, scale, train):
    """ALBEF ITM with hard negatives: the fusion on [positives; (image i, sampled text); (sampled image, text j)]."""
    b = ids.shape[0]
    sim = scale * jnp.matmul(zimg, ztxt.T, precision=jax.lax.Precision.HIGHEST)
    same_text = same_text_pairs(ids)  # equal texts are not negatives
    neg_txt, neg_img = sample_hard_negatives(rng, sim, same_text, self.itm_hard_fraction)
    img_all = jnp.concatenate([img_tokens, img_tokens, img_tokens[neg_img]], axis=0)
    txt_all = jnp.concatenate([txt_tokens, txt_tokens[neg_txt], txt_tokens], axis=0)
    valid_all = jnp.concatenate([valid, valid[neg_txt], valid], axis=0)
    cls, _, _ = self._fuse(img_all, txt_all, valid_all, train=train)
    labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)])
    return {"logits": self.itm_head(cls).astype(jnp.float32), "labels": labels}


def build(cfg: dict) -> TwoLeg:
  """The 'two_leg' framework's builder (`vlm_jax.models.FRAMEWORKS`).

  Keys: image, text (encoder dicts; text gets causal=False and pool_type='first' by default — BERT/FLAVA's [CLS] —
  and vocab_size + 1 embedding rows), fusion = {'kind': 'merged'|'cross', 'variant' (a ViT size name: width,
  depth, mlp_dim, num_heads), width, depth, mlp_dim, num_heads, dropout}, tasks (subset of TASKS), mlm_ratio,
  mim_ratio, mlm_fused, mlm_skip_first, itm_hard_fraction (probability that an ITM negative is mined by
  similarity rather than drawn uniformly; 1.0 = ALBEF), decoder = {width, depth, num_heads}, embed_dim,
  logit_scale_init, max_log_logit_scale, scan, remat, dtype, param_dtype.
  """
  cfg = dict(cfg)
  known = {"image", "text", "fusion", "tasks", "mlm_ratio", "mim_ratio", "mlm_fused", "mlm_skip_first", "decoder",
           "embed_dim", "logit_scale_init", "max_log_logit_scale", "scan", "remat", "dtype", "param_dtype", "attention",
           "logit_bias_init", "simclr_head", "flip_mask_ratio", "itm_hard_fraction"}
  unknown = sorted(set(cfg) - known)
  if unknown:
    raise UserError(f"unknown two_leg model option(s) {unknown}; valid: {sorted(known)}")
  defaults = common_defaults(cfg)
  image_cfg, text_cfg = _plain(cfg.get("image")), _plain(cfg.get("text"))
  if not image_cfg or not text_cfg:
    raise UserError("a two_leg model config needs both `image` and `text` encoder dicts")
  if "vocab_size" not in text_cfg:
    raise UserError("two_leg: model.text.vocab_size is required (the runner sets it from the tokenizer)")
  vocab = int(text_cfg["vocab_size"])
  text_cfg.update(vocab_size=vocab + 1)  # row `vocab` is [MASK]
  text_cfg.setdefault("causal", False)
  text_cfg.setdefault("pool_type", "first")
  image_defaults = dict(defaults, remat=defaults["remat"] != "none") if image_cfg.get("kind") == "resnet" \
      else defaults
  image = build_encoder(image_cfg, image_defaults, IMAGE_KINDS)
  text = build_encoder(text_cfg, defaults, TEXT_KINDS)

  fcfg = _plain(cfg.get("fusion")) or {"kind": "merged", "variant": "tiny"}
  fkind = fcfg.pop("kind", "merged")
  if fkind not in FUSIONS:
    raise UserError(f"unknown fusion kind {fkind!r}; valid choices: {', '.join(FUSIONS)}")
  sizes = variants.vit_variant(fcfg.pop("variant", "tiny"))
  sizes.pop("patch_size")
  bad = sorted(set(fcfg) - {"width", "depth", "mlp_dim", "num_heads", "dropout"})
  if bad:
    raise UserError(f"unknown fusion option(s) {bad}; valid: kind, variant, width, depth, mlp_dim, num_heads, "
                    "dropout")
  sizes.update(fcfg)
  width = int(sizes.pop("width"))
  if width % int(sizes["num_heads"]):
    raise UserError(f"fusion width {width} is not divisible by num_heads {sizes['num_heads']}")
  fusion = Fusion(kind=fkind, width=width, depth=int(sizes["depth"]), num_heads=int(sizes["num_heads"]),
                  mlp_dim=int(sizes["mlp_dim"]), dropout=float(sizes.get("dropout", 0.0)),
                  scan=defaults["scan"], remat=defaults["remat"], dtype=defaults["dtype"],
                  param_dtype=defaults["param_dtype"])
  tasks = tuple(cfg.get("tasks", ("itm",)) or ())
  dec = _plain(cfg.get("decoder"))
  max_log = cfg.get("max_log_logit_scale", MAX_LOG_LOGIT_SCALE)
  return TwoLeg(
      img=image, txt=text, vocab_size=vocab, fusion=fusion, embed_dim=int(cfg.get("embed_dim", 512)), tasks=tasks,
      mlm_ratio=float(cfg.get("mlm_ratio", 0.15)), mim_ratio=float(cfg.get("mim_ratio", 0.4)),
      mlm_fused=bool(cfg.get("mlm_fused", False)), mlm_skip_first=bool(cfg.get("mlm_skip_first", True)),
      itm_hard_fraction=float(cfg.get("itm_hard_fraction", 1.0)),
      decoder_width=int(dec.get("width", 64)), decoder_depth=int(dec.get("depth", 1)),
      decoder_heads=int(dec.get("num_heads", 2)),
      logit_scale_init=float(cfg.get("logit_scale_init", math.log(1 / 0.07))),
      max_log_logit_scale=None if max_log is None else float(max_log),
      dtype=defaults["dtype"], param_dtype=defaults["param_dtype"])
