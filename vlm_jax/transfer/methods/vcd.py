"""Classification by description (Menon & Vondrick 2023, "Visual Classification via Description from Large
Language Models", ICLR): every class c has a set D(c) of descriptor sentences, and its score is the mean of the
image's similarity to each of them,

  s(c, x) = (1 / |D(c)|) · Σ_{d ∈ D(c)} φ(d, x),    φ(d, x) = cos(f(x), g(d))        (VCD eq. 1)
  logits(x)_c = exp(log τ⁻¹) · s(c, x)

with f, g the frozen image and text encoders. Unlike CLIP's prompt ensemble (`zeroshot`: the mean of the
normalised text embeddings, renormalised), the similarities themselves are averaged, so no renormalisation; with
one descriptor per class both are the single-prompt zero-shot classifier. Nothing is learned.

Descriptors (`method.descriptors`): a JSON file {class name: [sentence, …]} (`embedding.prompts.load_descriptions`,
the CuPL format), given as a path or as the name of a file shipped in `vlm_jax/embedding/descriptions/`
('synthetic': the procedural shapes' 100 colour × shape classes, every synthetic shift task); '' takes the run's
`--config.descriptions`. Each sentence is encoded verbatim (the paper writes "{class} which (is/has/etc)
{descriptor}"; the shipped file spells the class into each sentence itself).
"""

from __future__ import annotations

import importlib.resources
import os

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vlm_jax.embedding.prompts import load_descriptions
from vlm_jax.errors import UserError
from vlm_jax.transfer.methods import Method
from vlm_jax.transfer.methods import prompting as pr
from vlm_jax.transfer.methods.zeroshot import zero_loss

_DIR = "descriptions"


def descriptor_path(spec: str) -> str:
  """A descriptor file: `spec` itself when it is a path, else the shipped `descriptions/<spec>.json`."""
  if os.path.sep in spec or spec.endswith(".json"):
    return spec
  path = importlib.resources.files("vlm_jax.embedding") / _DIR / f"{spec}.json"
  if not path.is_file():
    shipped = sorted(p.name[:-5] for p in (importlib.resources.files("vlm_jax.embedding") / _DIR).iterdir()
                     if p.name.endswith(".json"))
    raise UserError(f"unknown descriptor file {spec!r}; shipped: {shipped} (or give a .json path)")
  return str(path)


class VCD(nn.Module):
  """The frozen base and the descriptor sentences of every class (flat: `hc.ids`, `hc.owner`)."""
  base: nn.Module
  descriptors: pr.HandCrafted

  def descriptor_features(self):
    """L2-normalised g(d) [P, E] of every descriptor sentence (P over all classes)."""
    return self.base.encode_text(jnp.asarray(self.descriptors.ids, jnp.int32), train=False)

  def classify(self, images):
    """logits [B, C] = exp(log τ⁻¹) · mean_{d ∈ D(c)} cos(f(x), g(d)) (VCD eq. 1)."""
    sims = pr.image_embeddings(self.base, images) @ self.descriptor_features().T  # [B, P]
    owner = jnp.asarray(self.descriptors.owner, jnp.int32)
    counts = jnp.zeros((self.descriptors.n_classes,), jnp.float32).at[owner].add(1.0)
    per_class = jnp.zeros((sims.shape[0], self.descriptors.n_classes), jnp.float32).at[:, owner].add(sims)
    return self.base.logit_scale() * per_class / counts

  def __call__(self, batch, *, train: bool = False):
    return {"logits": self.classify(batch["image"])}


def make_descriptors(tokenizer, sentences: list[tuple[str, ...]]) -> pr.HandCrafted:
  """The tokenised descriptor sentences of C classes, flat, with the class owning each."""
  flat = [s for per in sentences for s in per]
  owner = [c for c, per in enumerate(sentences) for _ in per]
  ids = np.asarray(tokenizer(flat), np.int32)
  return pr.HandCrafted(tuple(map(tuple, ids.tolist())), tuple(owner), len(sentences))


def check(config) -> None:
  """Preflight: a descriptor file (`method.descriptors`, shipped name or readable path) or --config.descriptions."""
  spec = str(config.method.get("descriptors", "") or "")
  if not spec and not str(config.get("descriptions", "") or ""):
    raise UserError("vcd needs descriptor sentences: set --config.method.descriptors (a shipped name such as "
                    "'synthetic', or a JSON path) or --config.descriptions")
  if spec and not os.path.isfile(descriptor_path(spec)):
    raise UserError(f"descriptor file {spec} not found")


def build(cfg, *, base_model, base_config, tokenizer, class_names, templates, descriptions=None) -> Method:
  del base_config, templates
  spec = str(cfg.get("descriptors", "") or "")
  if spec:
    descriptions = load_descriptions(descriptor_path(spec), class_names)
  if not descriptions:
    raise UserError("vcd needs descriptor sentences: set --config.method.descriptors (a shipped name such as "
                    "'synthetic', or a JSON path) or --config.descriptions")
  return Method(VCD(base_model, make_descriptors(tokenizer, descriptions)), zero_loss, pr.classify_fn)
