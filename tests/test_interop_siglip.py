"""Parity of `vlm_jax.interop.siglip` with open_clip's SigLIP (`ViT-B-16-SigLIP` family, reduced width).

The arch is the installed `ViT-B-16-SigLIP.json` with smaller towers: the timm trunk gets
`vision_cfg.timm_model_kwargs` (embed 64, depth 2, heads 2, 32 px, patch 8) and the text tower width 64, 2 layers,
context 16, vocab 1000. The model is randomly initialised, every tensor perturbed, logit scale/bias non-default.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest

from vlm_jax.errors import UserError

pytestmark = pytest.mark.interop

TOL = 1e-4
TRUNK_KW = {"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 32, "patch_size": 8}


def _arch(name="ViT-B-16-SigLIP"):
  import open_clip
  path = os.path.join(os.path.dirname(open_clip.__file__), "model_configs", name + ".json")
  with open(path) as f:
    cfg = json.load(f)
  cfg["embed_dim"] = 64
  cfg["vision_cfg"].update(image_size=32, timm_model_kwargs=TRUNK_KW)
  cfg["text_cfg"].update(width=64, heads=2, layers=2, context_length=16, vocab_size=1000)
  return cfg


def _open_clip_model(cfg, monkeypatch, seed=0):
  """CustomTextCLIP from `cfg`, the timm trunk built with `timm_model_kwargs` (open_clip has no such key)."""
  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  open_clip = pytest.importorskip("open_clip")
  kwargs = cfg["vision_cfg"]["timm_model_kwargs"]
  monkeypatch.setattr(timm, "create_model", functools.partial(timm.create_model, **kwargs))
  oc_cfg = json.loads(json.dumps(cfg))
  oc_cfg.pop("custom_text", None)
  oc_cfg["vision_cfg"].pop("timm_model_kwargs")
  torch.manual_seed(seed)
  model = open_clip.model.CustomTextCLIP(**oc_cfg).eval()
  monkeypatch.undo()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
    model.logit_scale.fill_(4.75)  # t = 115.6 > 100: not clamped
    model.logit_bias.fill_(-6.5)
  return model


def _inputs():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  ids = rng.integers(3, 999, size=(3, 16)).astype(np.int32)
  for r, n in enumerate((4, 9, 15)):  # tokens, EOS, pad (= EOS = 1) to the end
    ids[r, n:] = 1
  return images, ids


def _open_clip_embeddings(model, images, ids):
  import torch
  with torch.no_grad():
    zi = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2)), normalize=True).numpy()
    zt = model.encode_text(torch.from_numpy(ids).long(), normalize=True).numpy()
  return zi, zt


def _vlm(config, variables, images, ids):
  from vlm_jax.models import build_model
  model = build_model(config.model)
  out = model.apply(variables, {"image": images, "text": ids})
  return np.asarray(out["zimg"]), np.asarray(out["ztxt"]), float(out["logit_scale"]), float(out["logit_bias"])


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: np.asarray(v)})
  return out


def test_open_clip_siglip_parity_and_round_trip(monkeypatch):
  torch = pytest.importorskip("torch")
  from vlm_jax.interop import siglip
  cfg = _arch()
  model = _open_clip_model(cfg, monkeypatch)
  sd = model.state_dict()
  config, variables = siglip.from_open_clip_siglip(sd, cfg)
  m = config.model
  assert (m.image.num_heads, m.image.act, m.image.norm_eps, m.text.pool_type, m.text.causal) == (
      2, "gelu", 1e-6, "last", False)
  assert config.tokenizer.to_dict() == {"name": "siglip", "model_path": "", "context_length": 16}

  images, ids = _inputs()
  want_i, want_t = _open_clip_embeddings(model, images, ids)
  got_i, got_t, scale, bias = _vlm(config, variables, images, ids)
  assert np.abs(got_i - want_i).max() <= TOL
  assert np.abs(got_t - want_t).max() <= TOL
  assert np.float32(scale) == np.float32(model.logit_scale.exp().item())
  assert np.float32(bias) == np.float32(model.logit_bias.item())

  exported = siglip.to_open_clip_siglip(config, variables)
  assert exported.keys() == sd.keys()
  for k, v in sd.items():
    np.testing.assert_array_equal(exported[k], v.numpy(), err_msg=k)
  fresh = _open_clip_model(cfg, monkeypatch, seed=5)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  again_i, again_t = _open_clip_embeddings(fresh, images, ids)
  np.testing.assert_array_equal(again_i, want_i)
  np.testing.assert_array_equal(again_t, want_t)
  _, variables2 = siglip.from_open_clip_siglip(exported, cfg)
  a, b = _flat(variables), _flat(variables2)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_open_clip_siglip_at_another_resolution(monkeypatch):
  """image_size=48 resamples the position table as timm's `set_input_size` does; embeddings still match."""
  pytest.importorskip("torch")
  from vlm_jax.interop import siglip
  cfg = _arch()
  model = _open_clip_model(cfg, monkeypatch)
  config, variables = siglip.from_open_clip_siglip(model.state_dict(), cfg, image_size=48)
  assert config.data.image_size == 48 and variables["params"]["img"]["pos_embedding"].shape == (1, 36, 64)
  model.visual.trunk.set_input_size(img_size=48)
  images = np.random.default_rng(3).normal(size=(2, 48, 48, 3)).astype(np.float32)
  _, ids = _inputs()
  want_i, _ = _open_clip_embeddings(model, images, ids[:2])
  got_i, _, _, _ = _vlm(config, variables, images, ids[:2])
  assert np.abs(got_i - want_i).max() <= TOL


def test_open_clip_siglip_exports_to_hf(monkeypatch, tmp_path):
  """open_clip SigLIP -> vlm_jax -> Hugging Face `SiglipModel`: the same network (exact GELU written as 'gelu')."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from vlm_jax.interop import hf, siglip
  cfg = _arch()
  model = _open_clip_model(cfg, monkeypatch)
  config, variables = siglip.from_open_clip_siglip(model.state_dict(), cfg)
  hf.to_hf(config, variables, str(tmp_path))
  reloaded = transformers.SiglipModel.from_pretrained(tmp_path).eval()
  images, ids = _inputs()
  want_i, want_t = _open_clip_embeddings(model, images, ids)
  with torch.no_grad():
    zi = reloaded.get_image_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).pooler_output
    zt = reloaded.get_text_features(input_ids=torch.from_numpy(ids).long()).pooler_output
  assert np.abs(torch.nn.functional.normalize(zi, dim=-1).numpy() - want_i).max() <= TOL
  assert np.abs(torch.nn.functional.normalize(zt, dim=-1).numpy() - want_t).max() <= TOL
  assert reloaded.logit_scale.item() == model.logit_scale.item()
  assert reloaded.logit_bias.item() == model.logit_bias.item()


def test_open_clip_dispatches_siglip_json(monkeypatch, tmp_path):
  """`vlm_jax.interop.open_clip.from_open_clip` sends a SigLIP model-config JSON here (helper module)."""
  pytest.importorskip("torch")
  from vlm_jax.interop import open_clip as oc
  cfg = _arch()
  model = _open_clip_model(cfg, monkeypatch)
  path = tmp_path / "ViT-B-16-SigLIP-reduced.json"
  path.write_text(json.dumps(cfg))
  config, variables = oc.from_open_clip(model.state_dict(), str(path))
  assert config.source.arch == "ViT-B-16-SigLIP-reduced" and "logit_bias" in variables["params"]
  sd = oc.to_open_clip(config, variables)
  for k, v in model.state_dict().items():
    np.testing.assert_array_equal(sd[k], v.numpy(), err_msg=k)


def test_full_size_arch_is_read_from_open_clip_and_timm():
  pytest.importorskip("open_clip")
  from vlm_jax.interop import siglip
  name, cfg = siglip.arch_config("ViT-B-16-SigLIP")
  assert name == "ViT-B-16-SigLIP" and cfg["text_cfg"]["pool_type"] == "last"
  info = siglip._timm_trunk_info(cfg["vision_cfg"])  # meta device: no memory, no weights
  assert (info["num_heads"], info["act"], info["norm_eps"]) == (12, "gelu", 1e-6)
  assert info["shapes"]["visual.trunk.pos_embed"] == (1, 196, 768)
  _, so400m = siglip.arch_config("ViT-SO400M-14-SigLIP")
  assert siglip._timm_trunk_info(so400m["vision_cfg"])["num_heads"] == 16  # width 1152: not width // 64


def test_siglip_errors(monkeypatch):
  pytest.importorskip("torch")
  from vlm_jax.interop import siglip
  cfg = _arch()
  sd = dict(_open_clip_model(cfg, monkeypatch).state_dict())
  sd["visual.trunk.blocks.0.ls1.gamma"] = sd["visual.trunk.norm.weight"]
  with pytest.raises(UserError, match="ls1.gamma"):
    siglip.from_open_clip_siglip(sd, cfg)
  clip_arch = siglip.arch_config("ViT-B-32")[1]
  with pytest.raises(UserError, match="timm_model_name"):
    siglip.from_open_clip_siglip(sd, clip_arch)
