"""Parity of vlm_jax with open_clip (randomly initialised, perturbed) CLIP ViTs and ModifiedResNets, exact export
round trips, and the safe weight-file loader (.pt, .safetensors, TorchScript)."""

from __future__ import annotations

import json
import os
import pickle
import sys
import types
import warnings
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from vlm_jax.errors import UserError  # noqa: E402
from vlm_jax.interop import open_clip as oc  # noqa: E402
from vlm_jax.interop.torch_weights import load_state_dict  # noqa: E402
from vlm_jax.models import build_model  # noqa: E402

pytestmark = pytest.mark.interop
ATOL = 1e-4
TINY_TEXT = dict(context_length=16, vocab_size=100, width=64, heads=2, layers=2)
TINY_VIT = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=64, head_width=32, patch_size=8),
                text_cfg=TINY_TEXT)
TINY_RN = dict(embed_dim=48, vision_cfg=dict(image_size=64, layers=[1, 2, 1, 1], width=16, head_width=32,
                                             patch_size=None), text_cfg=TINY_TEXT)
MEASURED = {}  # arch -> max abs differences (printed by test_report_max_differences)


class Payload:
  """An arbitrary pickled object: the loader must refuse to unpickle it."""


def perturbed(model, seed=0):
  """Makes the trivially initialised parameters non-trivial (LN/BN scales, zero-init biases; all of a tiny
  model), logit scale 2.5, and gives every BatchNorm running statistics of real activations (one train-mode
  pass, then scaled), as a trained ResNet has."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in model.named_parameters():
      if p.ndim <= 1 or p.numel() < 100_000:  # big matrices keep their random init (fast for full sizes)
        p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.logit_scale.fill_(2.5)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if bns:
      for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration pass
      size = model.visual.image_size
      model.train().visual(torch.randn((4, 3) + tuple(np.broadcast_to(size, 2)), generator=gen))
      for bn in bns:
        bn.running_mean.mul_(1 + 0.1 * torch.randn(bn.running_mean.shape, generator=gen))
        bn.running_var.mul_(0.8 + 0.4 * torch.rand(bn.running_var.shape, generator=gen))
        bn.num_batches_tracked.fill_(7)
  return model.eval()


def inputs(size, length, vocab, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(3, 3, size, size)).astype(np.float32)
  ids = rng.integers(1, vocab - 1, size=(3, length))
  for row, eot in enumerate((4, length // 2, length - 1)):  # EOT (the largest id) then padding
    ids[row, eot], ids[row, eot + 1:] = vocab - 1, 0
  return x, ids


def parity(tmodel, config, variables, arch):
  """Max |open_clip - vlm_jax| of normalised image/text embeddings; the outputs must depend on the inputs."""
  size = config.data.image_size
  x, ids = inputs(size, config.model.text.max_len, config.model.text.vocab_size)
  with torch.no_grad():
    ri = tmodel.encode_image(torch.from_numpy(x), normalize=True).numpy()
    rt = tmodel.encode_text(torch.from_numpy(ids), normalize=True).numpy()
  model = build_model(config.model)
  zi = np.asarray(model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)), method="encode_image"))
  zt = np.asarray(model.apply(variables, jnp.asarray(ids, jnp.int32), method="encode_text"))
  d_img, d_txt = float(np.abs(zi - ri).max()), float(np.abs(zt - rt).max())
  MEASURED[arch] = dict(image=d_img, text=d_txt)
  assert d_img <= ATOL and d_txt <= ATOL, MEASURED[arch]
  assert np.abs(ri[0] - ri[1]).max() > 100 * ATOL and np.abs(rt[0] - rt[1]).max() > 100 * ATOL
  assert variables["params"]["log_logit_scale"] == tmodel.logit_scale.detach().numpy()  # the parameter: bit-equal
  scale = float(model.apply(variables, method="logit_scale"))  # exp() implementations may differ by an ulp
  assert scale == pytest.approx(float(tmodel.logit_scale.detach().exp()), rel=1e-6)
  return d_img, d_txt


def assert_round_trip(sd, config, variables, arch):
  """to(from(sd)) == sd tensor for tensor (values and dtypes), and from(to(...)) == the same variables."""
  sd = {k: v.numpy() for k, v in sd.items() if k != "attn_mask"}
  back = oc.to_open_clip(config, variables)
  assert set(back) == set(sd)
  for k, v in sd.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v), k
  config2, variables2 = oc.from_open_clip(back, arch, check=False)
  f1, f2 = flatten_dict(variables), flatten_dict(variables2)
  assert f1.keys() == f2.keys() and all(np.array_equal(f1[k], f2[k]) for k in f1)
  assert config2.model == config.model and config2.data == config.data


def write_json(tmp_path, cfg, name="arch.json"):
  path = tmp_path / name
  path.write_text(json.dumps(cfg))
  return str(path)


@pytest.mark.parametrize("quick_gelu,custom_text", [(False, False), (True, True)])
def test_reduced_vit_parity_and_round_trip(tmp_path, quick_gelu, custom_text):
  cfg = dict(TINY_VIT, quick_gelu=quick_gelu, custom_text=custom_text)
  cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
  tmodel = perturbed(cls(**{k: v for k, v in cfg.items() if k != "custom_text"}))
  arch = write_json(tmp_path, cfg)
  config, variables = oc.from_open_clip(tmodel.state_dict(), arch)
  assert config.model.image.act == config.model.text.act == ("quick_gelu" if quick_gelu else "gelu")
  assert config.source.text_prefix == ("text." if custom_text else "")
  assert json.loads(config.to_json())["model"]["image"]["cls_posemb"] is True  # the config is plain data
  parity(tmodel, config, variables, f"tiny ViT (quick_gelu={quick_gelu})")
  assert_round_trip(tmodel.state_dict(), config, variables, arch)


def test_reduced_resnet_parity_and_round_trip(tmp_path):
  tmodel = perturbed(open_clip.CLIP(**TINY_RN))
  arch = write_json(tmp_path, TINY_RN)
  config, variables = oc.from_open_clip(tmodel.state_dict(), arch)
  assert config.model.image.kind == "resnet" and set(variables) == {"params", "batch_stats"}
  np.testing.assert_array_equal(variables["batch_stats"]["img"]["layer2_0"]["downsample_bn"]["var"],
                                tmodel.state_dict()["visual.layer2.0.downsample.1.running_var"].numpy())
  parity(tmodel, config, variables, "tiny ModifiedResNet")
  assert_round_trip(tmodel.state_dict(), config, variables, arch)


def test_full_vit_b32_by_name():
  tmodel = perturbed(open_clip.create_model("ViT-B-32"))
  config, variables = oc.from_open_clip(tmodel.state_dict(), "ViT-B-32", check=False)  # parity checks shapes
  img = config.model.image
  assert (img.width, img.depth, img.num_heads, img.patch_size, config.data.image_size) == (768, 12, 12, 32, 224)
  assert config.model.text.act == "gelu" and config.tokenizer.to_dict() == {"name": "clip_bpe",
                                                                            "context_length": 77}
  parity(tmodel, config, variables, "ViT-B-32 (full size)")
  assert_round_trip(tmodel.state_dict(), config, variables, "ViT-B-32")


def test_full_rn50_by_name():
  tmodel = perturbed(open_clip.create_model("RN50"))
  config, variables = oc.from_open_clip(tmodel.state_dict(), "RN50", check=False)
  assert config.model.image.to_dict() == dict(kind="resnet", layers=[3, 4, 6, 3], width=64, heads=32,
                                              output_dim=1024, image_size=224)
  parity(tmodel, config, variables, "RN50 (full size)")
  assert_round_trip(tmodel.state_dict(), config, variables, "RN50")


def test_quickgelu_name_and_openai_default(tmp_path):
  _, cfg = oc.model_config_json("ViT-B-32-quickgelu")
  assert cfg["quick_gelu"] is True
  tmodel = perturbed(open_clip.CLIP(**TINY_VIT))
  sd = tmodel.state_dict()
  assert oc.from_open_clip(sd, None, check=False)[0].model.text.act == "gelu"
  assert oc.from_openai(sd, check=False)[0].model.image.act == "quick_gelu"
  assert oc.from_openai(sd, check=False)[0].source.format == "openai"


def test_resized_vit_matches_open_clip_at_the_new_resolution(tmp_path):
  """image_size= resizes the position grid; exported back, open_clip at that resolution computes the same."""
  tmodel = perturbed(open_clip.CLIP(**TINY_VIT))
  config, variables = oc.from_open_clip(tmodel.state_dict(), write_json(tmp_path, TINY_VIT), image_size=48)
  assert config.data.image_size == 48 and variables["params"]["img"]["pos_embedding"].shape == (1, 36, 64)
  new = open_clip.CLIP(**oc.open_clip_model_config(config)).eval()
  new.load_state_dict({k: torch.from_numpy(v) for k, v in oc.to_open_clip(config, variables).items()})
  parity(new, config, variables, "tiny ViT resized 32->48")


def test_export_model_trained_in_vlm_jax():
  """A vlm_jax CLIP ViT without the class position embedding exports as the same open_clip network."""
  config = {"model": dict(
      image=dict(kind="vit", width=64, depth=1, mlp_dim=128, num_heads=2, patch_size=8, image_size=32,
                 pool_type="cls", pre_norm=True, patch_bias=False, act="quick_gelu"),
      text=dict(kind="text", vocab_size=100, max_len=16, width=32, depth=1, mlp_dim=96, num_heads=2,
                act="quick_gelu"), embed_dim=24)}
  model = build_model(config["model"])
  x, ids = inputs(32, 16, 100)
  batch = {"image": jnp.zeros((1, 32, 32, 3)), "text": jnp.zeros((1, 16), jnp.int32)}
  abstract = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), batch)))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda a: rng.normal(0, 0.1, a.shape).astype(np.float32), abstract)
  tmodel = open_clip.CLIP(**oc.open_clip_model_config(config)).eval()
  tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in oc.to_open_clip(config, variables).items()})
  with torch.no_grad():
    ri = tmodel.encode_image(torch.from_numpy(x), normalize=True).numpy()
    rt = tmodel.encode_text(torch.from_numpy(ids), normalize=True).numpy()
  zi = model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)), method="encode_image")
  zt = model.apply(variables, jnp.asarray(ids, jnp.int32), method="encode_text")
  assert np.abs(zi - ri).max() <= ATOL and np.abs(zt - rt).max() <= ATOL
  bad = dict(config["model"], image=dict(config["model"]["image"], pool_type="gap"))
  with pytest.raises(UserError, match="pool_type='cls'"):
    oc.to_open_clip({"model": bad}, variables)


def test_user_errors(tmp_path):
  sd = perturbed(open_clip.CLIP(**TINY_VIT)).state_dict()
  with pytest.raises(UserError, match="has embed_dim 512, but the state dict has 32"):
    oc.from_open_clip(sd, "ViT-B-32")
  with pytest.raises(UserError, match="unknown open_clip arch"):
    oc.from_open_clip(sd, "ViT-Q-99")
  with pytest.raises(UserError, match="ls_init_value"):
    oc.from_open_clip(sd, write_json(tmp_path, dict(TINY_VIT, vision_cfg=dict(TINY_VIT["vision_cfg"],
                                                                               ls_init_value=1e-4))))
  with pytest.raises(UserError, match="is a ResNet"):
    oc.from_open_clip(sd, "RN50")
  extra = dict(sd, **{"visual.extra": torch.zeros(3)})
  with pytest.raises(UserError, match="no place"):
    oc.from_open_clip(extra, write_json(tmp_path, TINY_VIT))
  with pytest.raises(UserError) as err:
    oc.from_open_clip({"logit_scale": torch.zeros(())}, None)
  assert "\n" not in str(err.value)


def test_siglip_names_dispatch_to_helper(monkeypatch):
  import vlm_jax.interop as interop  # noqa: PLC0415
  fake = types.ModuleType("vlm_jax.interop.siglip")
  fake.from_open_clip_siglip = lambda sd, arch, **kw: ("siglip", arch, kw)
  fake.to_open_clip_siglip = lambda config, variables, **kw: ("exported", kw)
  monkeypatch.setitem(sys.modules, "vlm_jax.interop.siglip", fake)
  monkeypatch.setattr(interop, "siglip", fake, raising=False)
  assert oc.from_open_clip({}, "ViT-B-16-SigLIP", image_size=384) == ("siglip", "ViT-B-16-SigLIP",
                                                                      {"image_size": 384})
  assert oc.to_open_clip({"model": {"logit_bias_init": -10.0}}, {}, dtype="float16") == ("exported",
                                                                                       {"dtype": "float16"})


def test_safe_loader_pt_safetensors_and_wrapped(tmp_path):
  from safetensors.torch import save_file  # noqa: PLC0415
  sd = perturbed(open_clip.CLIP(**TINY_RN)).state_dict()
  torch.save(sd, tmp_path / "m.pt")
  torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "ckpt.pt")
  mixed = {k: (v.to(torch.bfloat16) if k.endswith("_projection") else v)
           for k, v in sd.items() if v.is_floating_point()}
  save_file(mixed, str(tmp_path / "m.safetensors"))
  for name, ref in (("m.pt", sd), ("ckpt.pt", sd), ("m.safetensors", mixed)):
    got = load_state_dict(str(tmp_path / name))
    assert set(got) == set(ref), name
    for k, v in ref.items():
      want = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
      assert np.array_equal(np.asarray(got[k], want.dtype), want), (name, k)
  assert load_state_dict(str(tmp_path / "m.safetensors"))["text_projection"].dtype.name == "bfloat16"
  torch.save({"state_dict": sd, "obj": Payload()}, tmp_path / "evil.pt")
  with pytest.raises(UserError, match="not unpickled"):
    load_state_dict(str(tmp_path / "evil.pt"))
  with pytest.raises(UserError, match="no such weight file"):
    load_state_dict(str(tmp_path / "missing.pt"))


def test_torchscript_archive_read_without_executing(tmp_path):
  """An OpenAI-style TorchScript archive (fp16 weights, as OpenAI ships) converts without torch.jit.load."""
  tmodel = perturbed(open_clip.CLIP(**dict(TINY_VIT, quick_gelu=True)))
  half = open_clip.CLIP(**dict(TINY_VIT, quick_gelu=True)).eval()
  half.load_state_dict(tmodel.state_dict())
  open_clip.model.convert_weights_to_lp(half)  # OpenAI's partial float16 layout
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # torch.jit.script is deprecated; OpenAI's archives were made with it
    torch.jit.script(half).save(str(tmp_path / "ViT-tiny.pt"))
  sd = load_state_dict(str(tmp_path / "ViT-tiny.pt"))
  ref = half.state_dict()
  assert all(np.array_equal(sd[k], ref[k].numpy()) and sd[k].dtype == ref[k].numpy().dtype for k in ref)
  config, variables = oc.from_openai(str(tmp_path / "ViT-tiny.pt"), write_json(tmp_path, TINY_VIT))
  assert config.source.file.endswith("ViT-tiny.pt") and "float16" in config.source.dtypes
  back = oc.to_open_clip(config, variables)
  assert all(np.array_equal(back[k], ref[k].numpy()) and back[k].dtype == ref[k].numpy().dtype for k in ref)
  half.float()
  parity(half, config, variables, "tiny ViT from a float16 TorchScript archive")


class Exploit:
  """Unpickling this would run a shell command; the TorchScript reader must refuse it."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (os.system, (f"touch {self.path}",))


def test_torchscript_reader_refuses_foreign_globals(tmp_path):
  marker = tmp_path / "pwned"
  archive = tmp_path / "evil.pt"
  with zipfile.ZipFile(archive, "w") as z:
    z.writestr("evil/data.pkl", pickle.dumps({"weight": Exploit(str(marker))}, protocol=2))
    z.writestr("evil/constants.pkl", pickle.dumps(()))
  with pytest.raises(UserError, match="will not resolve.*torch.save\\(model.state_dict\\(\\)"):
    load_state_dict(str(archive))
  assert not marker.exists()


def test_report_max_differences():
  """Prints the per-architecture maxima measured above (run with -s to see them)."""
  for arch, d in MEASURED.items():
    print(f"max |open_clip - vlm_jax| {arch}: image {d['image']:.2e}, text {d['text']:.2e}")


def test_converted_rn50_keeps_its_batchnorm_statistics_through_init(tmp_path):
  """A converted open_clip RN50 used through `config.init` (LiT: image tower from the checkpoint) brings every
  BatchNorm running mean / variance along, bit for bit (issue 12: only `params` used to be copied)."""
  from vlm_jax import assembly, interop, runs
  tmodel = perturbed(open_clip.create_model("RN50"))
  config, variables = oc.from_open_clip(tmodel.state_dict(), "RN50", check=False)
  saved = interop.save_converted(str(tmp_path / "rn50"), config, variables)
  run_config = runs.read_config(saved)
  model = assembly.model_of(run_config)
  abstract = nn.meta.unbox(assembly.abstract_variables(model, assembly.example_batch(run_config, model)))
  fresh = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)  # what a new run would initialise
  got = runs.initializer({"checkpoint": saved, "params": "^img/"})(fresh)
  flat = flatten_dict(got["batch_stats"], sep="/")
  assert len(flat) == 2 * sum(isinstance(m, torch.nn.BatchNorm2d) for m in tmodel.modules())
  torch_sd = tmodel.state_dict()
  np.testing.assert_array_equal(flat["img/layer3_5/bn2/mean"], torch_sd["visual.layer3.5.bn2.running_mean"].numpy())
  np.testing.assert_array_equal(flat["img/bn1/var"], torch_sd["visual.bn1.running_var"].numpy())
  want = flatten_dict(variables["batch_stats"], sep="/")
  for k, v in flat.items():
    np.testing.assert_array_equal(v, want[k])
