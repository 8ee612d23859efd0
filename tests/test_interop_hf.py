"""Parity of `vlm_jax.interop.hf` with Hugging Face `CLIPModel` / `SiglipModel` (small random configs).

Each model is randomly initialised (every tensor perturbed, so zero biases and unit LayerNorms cannot hide a
mapping error) with non-default logit scale/bias, saved with `save_pretrained`, converted, and compared on the
same inputs; then exported back and reloaded by transformers.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from vlm_jax.errors import UserError

pytestmark = pytest.mark.interop

TOL = 1e-4
TEXT = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)


def _perturb(model, torch, scale: float = 0.05):
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn_like(p))


def _clip(torch, transformers):
  torch.manual_seed(0)
  cfg = transformers.CLIPConfig(text_config=dict(TEXT, eos_token_id=999, bos_token_id=998, pad_token_id=0),
                                vision_config=VISION, projection_dim=32)
  model = transformers.CLIPModel(cfg).eval()
  _perturb(model, torch)
  with torch.no_grad():
    model.logit_scale.fill_(3.3)
  return model


def _siglip(torch, transformers):
  torch.manual_seed(1)
  cfg = transformers.SiglipConfig(text_config=dict(TEXT, pad_token_id=1, eos_token_id=1, bos_token_id=None),
                                  vision_config=VISION)
  model = transformers.SiglipModel(cfg).eval()
  _perturb(model, torch)
  with torch.no_grad():
    model.logit_scale.fill_(4.8)  # t = 121.5 > 100: SigLIP does not clamp
    model.logit_bias.fill_(-7.25)
  return model


def _inputs(siglip: bool):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  ids = rng.integers(3, 990, size=(3, 16)).astype(np.int32)
  if siglip:  # SigLIP rows: tokens, EOS, then pad (= EOS = 1) to the end; pooled at the last position
    for r, n in enumerate((5, 9, 15)):
      ids[r, n:] = 1
  else:  # CLIP rows: SOT, tokens, EOT (the largest id), pad 0
    for r, n in enumerate((4, 10, 15)):
      ids[r, 0], ids[r, n], ids[r, n + 1:] = 998, 999, 0
  return images, ids


def _hf_embeddings(model, torch, images, ids):
  with torch.no_grad():
    zi = model.get_image_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).pooler_output
    zt = model.get_text_features(input_ids=torch.from_numpy(ids).long()).pooler_output
  zi = torch.nn.functional.normalize(zi, dim=-1).numpy()
  zt = torch.nn.functional.normalize(zt, dim=-1).numpy()
  return zi, zt


def _vlm_embeddings(config, variables, images, ids):
  from vlm_jax.models import build_model
  model = build_model(config.model)
  zi = model.apply(variables, images, method="encode_image")
  zt = model.apply(variables, ids, method="encode_text")
  scale = model.apply(variables, method="logit_scale")
  return np.asarray(zi), np.asarray(zt), float(scale)


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


def _check_against_model(config, variables):
  import jax
  import jax.numpy as jnp
  import flax.linen as nn
  from vlm_jax.models import build_model
  model = build_model(config.model)
  batch = {"image": jnp.zeros((1, 32, 32, 3)), "text": jnp.zeros((1, 16), jnp.int32)}
  abstract = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), batch)))
  want = {k: v.shape for k, v in _flat(abstract).items()}
  assert want == {k: np.shape(v) for k, v in _flat(variables).items()}


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_parity_and_round_trip(kind, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("safetensors")
  from vlm_jax.interop import hf
  siglip = kind == "siglip"
  model = (_siglip if siglip else _clip)(torch, transformers)
  src = tmp_path / "hf"
  model.save_pretrained(src)
  config, variables = hf.from_hf(str(src))
  _check_against_model(config, variables)

  images, ids = _inputs(siglip)
  want_i, want_t = _hf_embeddings(model, torch, images, ids)
  got_i, got_t, scale = _vlm_embeddings(config, variables, images, ids)
  assert np.abs(got_i - want_i).max() <= TOL
  assert np.abs(got_t - want_t).max() <= TOL
  want_scale = np.float32(model.logit_scale.exp().item())  # exp is not correctly rounded everywhere: 1 ulp
  assert abs(np.float32(scale) - want_scale) <= np.spacing(want_scale)
  if siglip:
    assert np.float32(variables["params"]["logit_bias"]) == np.float32(model.logit_bias.item())
    assert config.tokenizer.name == "siglip" and config.data.mean == [0.5, 0.5, 0.5]
  else:
    assert "logit_bias" not in variables["params"] and config.tokenizer.name == "clip_bpe"

  # export: HF -> vlm_jax -> HF gives the original tensors; vlm_jax -> HF -> vlm_jax the same variables
  out = tmp_path / "export"
  hf.to_hf(config, variables, str(out))
  reloaded = type(model).from_pretrained(out).eval()
  original = model.state_dict()
  for k, v in reloaded.state_dict().items():
    assert torch.equal(v, original[k]), k
  again_i, again_t = _hf_embeddings(reloaded, torch, images, ids)
  np.testing.assert_array_equal(again_i, want_i)
  np.testing.assert_array_equal(again_t, want_t)
  config2, variables2 = hf.from_hf(str(out))
  a, b = _flat(variables), _flat(variables2)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert config2.model.to_dict() == config.model.to_dict()


def test_hf_export_of_scanned_vlm_jax_clip(tmp_path):
  """A CLIP pre-trained in vlm_jax (scanned layers, no class position row) exports; the HF model is the same net."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import ml_collections
  from vlm_jax.interop import hf
  from vlm_jax.models import build_model
  m = {"image": {"kind": "vit", "variant": "mu/8", "image_size": 32, "pool_type": "cls", "pre_norm": True,
                 "patch_bias": False, "act": "quick_gelu"},
       "text": {"kind": "text", "variant": "tiny", "vocab_size": 100, "max_len": 16},
       "embed_dim": 24, "logit_scale_init": 2.5, "scan": True}
  config = ml_collections.ConfigDict({"model": m, "data": {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}})
  model = build_model(config.model)
  images, ids = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32), np.array(
      [[1, 5, 7, 99, 0, 0], [1, 8, 9, 10, 11, 99]], np.int32)
  params = model.init(jax.random.key(0), {"image": jnp.asarray(images), "text": jnp.asarray(ids)})["params"]
  rng = np.random.default_rng(2)
  params = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.normal(size=x.shape).astype(np.float32),
                        nn.meta.unbox(params))
  variables = {"params": params}
  hf.to_hf(config, variables, str(tmp_path))
  reloaded = transformers.CLIPModel.from_pretrained(tmp_path).eval()
  assert json.load(open(os.path.join(tmp_path, "config.json")))["text_config"]["eos_token_id"] == 99
  want_i, want_t = _hf_embeddings(reloaded, torch, images, ids)
  got_i, got_t, _ = _vlm_embeddings(config, variables, images, ids)
  assert np.abs(got_i - want_i).max() <= TOL and np.abs(got_t - want_t).max() <= TOL


def test_hf_errors(tmp_path):
  pytest.importorskip("transformers")
  import ml_collections
  from vlm_jax.interop import hf
  with pytest.raises(UserError, match="config.json"):
    hf.from_hf(str(tmp_path))
  bad = ml_collections.ConfigDict({"model": {
      "image": {"kind": "vit", "variant": "mu/8", "image_size": 32, "pool_type": "gap"},
      "text": {"kind": "text", "variant": "tiny", "vocab_size": 100, "max_len": 16}, "embed_dim": 24}})
  with pytest.raises(UserError, match="pool_type='gap'"):
    hf.to_hf(bad, {"params": {}}, str(tmp_path / "x"))


def test_hf_sharded_and_pytorch_bin_layouts(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from vlm_jax.interop import hf
  model = _clip(torch, transformers)
  model.save_pretrained(tmp_path / "one")
  model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
  torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
  want = _flat(hf.from_hf(str(tmp_path / "one"))[1])
  for layout_dir in ("sharded", "bin"):
    got = _flat(hf.from_hf(str(tmp_path / layout_dir))[1])
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{layout_dir}: {k}")


def test_hf_unused_tensor_is_an_error(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from safetensors.torch import load_file, save_file
  from vlm_jax.interop import hf
  model = _clip(torch, transformers)
  model.save_pretrained(tmp_path)
  tensors = load_file(tmp_path / "model.safetensors")
  tensors["vision_model.extra.weight"] = torch.zeros(3)
  save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(UserError, match="vision_model.extra.weight"):
    hf.from_hf(str(tmp_path))
