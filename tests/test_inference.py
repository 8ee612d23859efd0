"""Converted-checkpoint format (`vlm_jax.interop.save_converted` / `load_converted`) and the inference API
(`vlm_jax.inference`): exact round trip, encoders equal to `model.apply`, batching, preprocessing, zero-shot
classification, a pre-training workdir, LiT initialisation and resolution changes."""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from tests import train_helpers as th
from vlm_jax import interop, inference
from vlm_jax.data import transforms
from vlm_jax.errors import UserError
from vlm_jax.models import build_model
from vlm_jax.parallel import mesh as mesh_lib, partitioning
from vlm_jax import assembly, runs
from vlm_jax import config_lib as cb

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def converted(model_cfg, *, image_size=16, seed=0):
  """A converter-style (config, variables) pair: random numpy weights of the described model."""
  model_cfg = ml_collections.ConfigDict(model_cfg)
  model_cfg.text.vocab_size, model_cfg.text.max_len = 70, 24  # the 'words' tokenizer: 70 ids, context 24
  config = ml_collections.ConfigDict({
      "model": model_cfg, "tokenizer": {"name": "words", "context_length": 24},
      "data": {"image_size": image_size, "mean": MEAN, "std": STD}, "source": {"format": "test", "arch": "micro"}})
  rng = np.random.default_rng(seed)
  model = build_model(config.model)
  abstract = partitioning.unbox(assembly.abstract_variables(model, assembly.example_batch(config, model)))

  def draw(path, s):
    if path[-1].key == "var":  # BatchNorm running variances are positive
      return (1.0 + rng.random(s.shape)).astype(s.dtype)
    return (0.3 * rng.standard_normal(s.shape)).astype(s.dtype)
  return config, jax.tree_util.tree_map_with_path(draw, abstract)


def resnet_siglip():
  m = cb.micro_model()
  m.image = {"kind": "resnet", "variant": "tiny", "image_size": 32}
  m.logit_scale_init, m.logit_bias_init = cb.SIGLIP_LOGIT_SCALE_INIT, cb.SIGLIP_LOGIT_BIAS_INIT
  return m


def one_device_mesh():
  return mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])


def jit_apply(model, variables, x, method):
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, method=method))(variables, x))


@pytest.fixture(scope="module")
def micro():
  return converted(cb.micro_model())


@pytest.fixture(scope="module")
def saved(micro, tmp_path_factory):
  return interop.save_converted(str(tmp_path_factory.mktemp("converted") / "vit"), *micro)


def _images(n, seed=0, size=16):
  return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def test_save_load_round_trip_is_exact(micro, saved):
  config, variables = micro
  loaded_config, loaded = interop.load_converted(saved)
  flat, got = (traverse_util.flatten_dict(t, sep="/") for t in (variables, loaded))
  assert flat.keys() == got.keys() and all(np.array_equal(flat[k], got[k]) for k in flat)
  assert loaded_config.model.to_dict() == config.model.to_dict()
  assert loaded_config.tokenizer.to_dict() == config.tokenizer.to_dict()
  assert tuple(loaded_config.data.mean) == MEAN and loaded_config.data.image_size == 16
  assert loaded_config.data.name == "synthetic" and dict(loaded_config.objectives) == {"clip": 1.0}
  assert loaded_config.source.arch == "micro" and "optimizer" in loaded_config  # a full run config
  # the readers pre-training checkpoints go through
  assert all(np.array_equal(flat[k], v) for k, v in traverse_util.flatten_dict(
      runs.load_variables(saved), sep="/").items())
  ckpt = runs.Checkpointer(os.path.join(saved, "checkpoints"), async_save=False)
  assert ckpt.latest_step() == 0 and ckpt.restore_config(0)["source"]["format"] == "test"
  ckpt.close()
  assert os.path.exists(os.path.join(saved, "config.json"))
  with pytest.raises(UserError, match="not empty"):
    interop.save_converted(saved, *micro)


def test_encoders_equal_model_apply(micro, saved):
  config, variables = micro
  model = build_model(config.model)
  m = inference.load(saved, mesh=one_device_mesh(), batch_size=8)
  x = _images(8)
  np.testing.assert_array_equal(m.encode_image(x), jit_apply(model, variables, x, "encode_image"))
  texts = ["a red circle on the left", "a small blue square", "a green star", "a circle"] * 2
  ids = m.tokenize(texts)
  np.testing.assert_array_equal(ids, m.tokenizer(texts))
  z_txt = m.encode_text(texts)
  np.testing.assert_array_equal(z_txt, jit_apply(model, variables, ids, "encode_text"))
  np.testing.assert_array_equal(z_txt, m.encode_text(ids))
  np.testing.assert_allclose(np.linalg.norm(z_txt, axis=1), 1.0, rtol=1e-5)
  assert m.logit_scale == pytest.approx(np.exp(variables["params"]["log_logit_scale"]), rel=1e-6)
  assert m.logit_bias is None
  dense = m.encode_dense(x)  # MaskCLIP dense features, [B, h, w, D], in the joint space
  np.testing.assert_array_equal(dense, jit_apply(model, variables, x, "encode_dense"))
  assert dense.shape[0] == 8 and dense.shape[-1] == z_txt.shape[-1]
  np.testing.assert_allclose(np.linalg.norm(dense, axis=-1), 1.0, rtol=1e-5)
  # sharded over the 8 simulated devices: the same numbers up to float rounding
  m8 = inference.load(saved, batch_size=8)
  np.testing.assert_allclose(m8.encode_image(x), m.encode_image(x), atol=1e-6)
  # parameters sharded over fsdp (logical-axis rules), batches over data x fsdp
  fsdp = inference.load(saved, batch_size=8, mesh=mesh_lib.make_mesh({"data": 2, "fsdp": 4}))
  kernel = fsdp.variables["params"]["txt_proj"]["kernel"]
  assert kernel.sharding.shard_shape(kernel.shape) == (8, 16)  # 'embed' (32) split over fsdp = 4
  np.testing.assert_allclose(fsdp.encode_image(x), m.encode_image(x), atol=1e-6)
  np.testing.assert_allclose(fsdp.encode_text(texts), z_txt, atol=1e-6)


def test_batches_are_padded_and_split(saved):
  m = inference.load(saved, batch_size=4, mesh=one_device_mesh())
  x = _images(11, seed=1)
  whole = m.encode_image(x)
  assert whole.shape == (11, 16)
  parts = np.concatenate([m.encode_image(x[:4]), m.encode_image(x[4:7]), m.encode_image(x[7:])])
  np.testing.assert_allclose(whole, parts, atol=1e-6)
  assert m.encode_image(x[:0]).shape == (0, 16) and m.encode_text([]).shape == (0, 16)
  short = inference.load(saved, batch_size=4, mesh=one_device_mesh(), tokenizer={"context_length": 8})
  assert short.tokenize(["a red circle"]).shape == (1, 8) and short.encode_text(["a red circle"]).shape == (1, 16)


def test_preprocess_is_the_documented_transform(saved):
  m = inference.load(saved, batch_size=8)
  rng = np.random.default_rng(0)
  arrays = [rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), rng.integers(0, 256, (40, 16, 3), dtype=np.uint8)]
  x = m.preprocess(arrays)
  want = np.stack([transforms.normalize(transforms.resize_center_crop(Image.fromarray(a), 16), MEAN, STD)
                   for a in arrays])
  np.testing.assert_array_equal(x, want)
  assert x.dtype == np.float32 and x.shape == (2, 16, 16, 3)
  np.testing.assert_array_equal(m.preprocess([Image.fromarray(a) for a in arrays]), x)
  np.testing.assert_array_equal(m.preprocess(arrays[0]), x[:1])  # one HWC image
  rgba = np.concatenate([arrays[0], np.full((20, 30, 1), 7, np.uint8)], axis=-1)
  np.testing.assert_array_equal(m.preprocess([rgba]), x[:1])  # alpha dropped
  gray = m.preprocess([arrays[0][..., 0]])
  assert gray.shape == (1, 16, 16, 3)
  with pytest.raises(UserError, match="uint8"):
    m.preprocess([arrays[0].astype(np.float32)])
  with pytest.raises(UserError, match="preprocess"):
    m.encode_image(arrays)


def test_resnet_batch_stats_and_siglip_bias(tmp_path):
  config, variables = converted(resnet_siglip(), image_size=32, seed=1)
  assert "batch_stats" in variables
  out = interop.save_converted(str(tmp_path / "rn"), config, variables)
  loaded_config, loaded = interop.load_converted(out)
  assert dict(loaded_config.objectives) == {"siglip": 1.0}
  for k, v in traverse_util.flatten_dict(variables, sep="/").items():
    np.testing.assert_array_equal(traverse_util.flatten_dict(loaded, sep="/")[k], v)
  m = inference.load(out, batch_size=8, mesh=one_device_mesh())
  assert m.logit_bias == pytest.approx(float(variables["params"]["logit_bias"]))
  x = _images(8, size=32)
  np.testing.assert_array_equal(m.encode_image(x), jit_apply(build_model(config.model), variables, x,
                                                             "encode_image"))
  images = [np.random.default_rng(i).integers(0, 256, (40, 36, 3), dtype=np.uint8) for i in range(3)]
  probs = m.classify(images, ["red circle", "blue square"], sigmoid=True)
  assert probs.shape == (3, 2) and np.all((probs > 0) & (probs < 1))
  np.testing.assert_allclose(m.classify(images, ["red circle", "blue square"]).sum(1), 1.0, rtol=1e-6)


def test_mismatched_weights_are_a_user_error(micro, tmp_path):
  config, variables = micro
  flat = traverse_util.flatten_dict(variables, sep="/")
  key = next(k for k in flat if k.endswith("txt_proj/kernel"))
  flat[key] = flat[key][:, :8]
  del flat[next(k for k in flat if k.endswith("log_logit_scale"))]
  with pytest.raises(UserError, match=r"missing params/log_logit_scale.*txt_proj/kernel has shape \(32, 8\)"):
    interop.save_converted(str(tmp_path / "bad"), config, traverse_util.unflatten_dict(flat, sep="/"))
  assert not os.path.exists(tmp_path / "bad")


@pytest.mark.parametrize("model_fn,old,new", [(cb.micro_model, 16, 24), (resnet_siglip, 32, 64)])
def test_image_size_change_resizes_position_embeddings(model_fn, old, new):
  """Baked-in resize = the tower's own call-time resize of the original table at the new resolution."""
  config, variables = converted(model_fn(), image_size=old)
  config2, variables2 = interop.with_image_size(config, variables, new)
  assert config2.data.image_size == new and config2.model.image.image_size == new
  assert config.model.image.image_size == old  # the input config is left alone
  x = _images(2, size=new)
  baked = jit_apply(build_model(config2.model), variables2, x, "encode_image")
  on_the_fly = jit_apply(build_model(config.model), variables, x, "encode_image")
  np.testing.assert_allclose(baked, on_the_fly, atol=1e-5)
  with pytest.raises(UserError, match="multiple of"):
    interop.with_image_size(config, variables, new + 1)


def test_lit_initialises_from_a_converted_checkpoint(micro, saved):
  config = th.micro_config("configs/pretrain/lit.py")
  config.init.checkpoint = saved
  target = traverse_util.flatten_dict(micro[1]["params"], sep="/")
  zeros = traverse_util.unflatten_dict({k: np.zeros_like(v) for k, v in target.items()}, sep="/")
  got = traverse_util.flatten_dict(runs.initializer(config.init)({"params": zeros})["params"], sep="/")
  for k, v in got.items():
    np.testing.assert_array_equal(v, target[k] if k.startswith("img/") else 0 * v)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A real 3-step micro pre-training run (words tokenizer, model config without vocab_size / max_len)."""
  from vlm_jax import runner
  workdir = str(tmp_path_factory.mktemp("trained"))
  runner.pretrain(th.micro_config(total_steps=3), workdir, quiet=True)
  return workdir


def test_pretrained_workdir_loads_and_classifies(trained):
  from vlm_jax.data import pipeline
  m = inference.load(trained, batch_size=16)
  assert m.config.model.text.max_len == 24 and m.image_size == 16
  variables = runs.load_variables(trained)
  x = pipeline.make_eval_arrays(m.config.data, "eval_seen", image_size=16)["image"][:5]
  np.testing.assert_allclose(m.encode_image(x), build_model(m.config.model).apply(variables, x,
                                                                                  method="encode_image"),
                             atol=1e-6)
  info = pipeline.dataset_info(m.config.data)
  src = pipeline.make_source(m.config.data, "eval_seen", image_size=24)
  images = [src.render(src.scene(i), masks=False)["image"] for i in range(6)]
  probs = m.classify(images, info["class_names"], templates=["a photo of a {}.", "a {} shape"])
  assert probs.shape == (6, len(info["class_names"])) and np.all(probs >= 0)
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
  with pytest.raises(UserError, match="SigLIP"):
    m.classify(images, info["class_names"], sigmoid=True)
