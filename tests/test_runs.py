"""The run-directory layer (`vlm_jax.runs`): resume from the newest readable checkpoint, initialisation from
several checkpoints (every variable collection), and BatchNorm statistics that train.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from tests import train_helpers as th
from vlm_jax import assembly, config_lib, interop, runner, runs
from vlm_jax.errors import UserError


def _largest_file(directory: str) -> str:
  files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


def _cut_short(directory: str) -> None:
  """Every file under `directory` loses its second half, as when the writes of a save were cut short. (Cutting
  only the largest file is not enough: which file is largest varies with how orbax chunked the save, and some
  of its files, e.g. a B-tree node superseded by the merged manifest, are not read on restore.)"""
  for d, _, fs in os.walk(directory):
    for f in fs:
      path = os.path.join(d, f)
      with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)


def test_unreadable_newest_checkpoint_is_skipped_and_resume_is_exact(tmp_path):
  wd = str(tmp_path / "run")
  overrides = {"total_steps": 6, "checkpoint_every_steps": 2, "keep_checkpoints": 3}
  r = th.run_cli(th.pretrain_cmd(wd, overrides=overrides))
  assert r.returncode == 0, r.stderr[-2000:]
  uninterrupted = th.losses(wd)
  ckpts = os.path.join(wd, "checkpoints")
  assert runs.steps(ckpts) == [2, 4, 6]
  _cut_short(os.path.join(ckpts, "6", "state"))

  r = th.run_cli(th.pretrain_cmd(wd, overrides=overrides))
  assert r.returncode == 0, r.stderr[-2000:]
  warnings = [ln for ln in r.stderr.splitlines() if "is unreadable and is skipped" in ln]
  print("\n".join(warnings))
  assert any(f"{ckpts}/6" in ln for ln in warnings), r.stderr[-2000:]
  assert f"resumed from {ckpts}/4" in r.stdout
  assert th.losses(wd) == uninterrupted  # steps 5 and 6 again, every digit
  assert runs.steps(ckpts) == [2, 4, 6] and any(d.startswith("unreadable-6-") for d in os.listdir(ckpts))
  # readers skip an unreadable step the same way
  shutil.rmtree(os.path.join(ckpts, "6"))
  shutil.copytree(os.path.join(ckpts, next(d for d in os.listdir(ckpts) if d.startswith("unreadable-6-"))),
                  os.path.join(ckpts, "6"))
  assert runs.load(wd).step == 4


def test_checkpoint_of_another_architecture_is_a_user_error(tmp_path):
  wd = str(tmp_path / "run")
  runner.pretrain(th.micro_config(total_steps=2), wd, quiet=True)
  wider = th.micro_config(total_steps=3)
  wider.model.embed_dim = 24
  with pytest.raises(UserError, match="does not match"):
    runner.pretrain(wider, wd, quiet=True)
  assert runs.steps(os.path.join(wd, "checkpoints")) == [2]  # nothing moved aside


def test_two_source_init_from_the_command_line(tmp_path):
  """A student run initialised from two checkpoints (the image tower of A, the text tower of B), both frozen:
  after training they are bit-identical to their sources."""
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  runner.pretrain(th.micro_config(total_steps=2, seed=1), a, quiet=True)
  runner.pretrain(th.micro_config(total_steps=2, seed=2), b, quiet=True)
  wd = str(tmp_path / "student")
  sources = (f'({{"checkpoint": "{a}", "params": "^img/"}}, '
             f'{{"checkpoint": "{b}", "params": "^txt/", "rename": {{"^txt/": "txt/"}}}})')
  r = th.run_cli(th.pretrain_cmd(wd, overrides={"total_steps": 2, "frozen": "^(img|txt)/"})
                 + [f"--config.init.sources={sources}"])
  assert r.returncode == 0, r.stderr[-2000:]
  got = traverse_util.flatten_dict(runs.load_variables(wd)["params"], sep="/")
  for src, prefix in ((a, "img/"), (b, "txt/")):
    want = traverse_util.flatten_dict(runs.load_variables(src)["params"], sep="/")
    keys = [k for k in got if k.startswith(prefix)]
    assert keys
    for k in keys:
      np.testing.assert_array_equal(got[k], want[k])
  saved = json.load(open(os.path.join(wd, "config.json")))
  assert [s["checkpoint"] for s in saved["init"]["sources"]] == [a, b]


def test_init_sources_are_validated():
  with pytest.raises(UserError, match="pass --config.init.checkpoint"):
    runs.sources({"checkpoint": "", "required": True})
  with pytest.raises(UserError, match="unknown key"):
    runs.sources({"sources": ({"checkpoint": "x", "param": "^img/"},)})
  assert runs.sources({"checkpoint": "", "sources": ({"checkpoint": "t", "params": "^teacher/"},)}) == [
      {"checkpoint": "t", "params": "^teacher/", "rename": {}, "required": False}]


def _resnet_config(train_batch_stats: bool):
  c = th.micro_config(total_steps=2)
  c.data.image_size = 32
  c.model.image = {"kind": "resnet", "variant": "tiny", "image_size": 32, "train_batch_stats": train_batch_stats}
  return c


def test_converted_resnet_keeps_its_batch_stats_through_init(tmp_path):
  """A converted ResNet (random weights and BatchNorm statistics) used through `config.init`: the statistics
  arrive bit for bit, and with frozen statistics (train_batch_stats False, the converted default) training
  leaves them so."""
  config = _resnet_config(train_batch_stats=False)
  config.model.text.update(vocab_size=70, max_len=24)
  model = assembly.model_of(config)
  example = assembly.example_batch(config, model)
  abstract = traverse_util.flatten_dict(nn_unbox(assembly.abstract_variables(model, example)), sep="/")
  rng = np.random.default_rng(0)
  flat = {}
  for k, s in abstract.items():
    flat[k] = ((1.0 + rng.random(s.shape)) if k.endswith("var") else 0.3 * rng.standard_normal(s.shape)
               ).astype(s.dtype)
  variables = traverse_util.unflatten_dict(flat, sep="/")
  converted = ml_collections.ConfigDict({"model": config.model, "tokenizer": config.tokenizer,
                                         "data": {"image_size": 32}, "source": {"format": "test"}})
  saved = interop.save_converted(str(tmp_path / "rn"), converted, variables)
  fresh = jax.device_get(model.init({"params": jax.random.key(0)}, example))
  fresh = jax.tree.map(np.asarray, nn_unbox(fresh))
  got = runs.initializer({"checkpoint": saved})(fresh)
  for k, v in traverse_util.flatten_dict(got["batch_stats"], sep="/").items():
    np.testing.assert_array_equal(v, flat[f"batch_stats/{k}"])
  # through the loop: LiT-style, image tower (and its statistics) from the converted model
  config.init.checkpoint, config.init.params, config.frozen = saved, "^img/", "^img/"
  wd = str(tmp_path / "lit")
  runner.pretrain(config, wd, quiet=True)
  after = traverse_util.flatten_dict(runs.load_variables(wd)["batch_stats"], sep="/")
  for k, v in after.items():
    np.testing.assert_array_equal(v, flat[f"batch_stats/{k}"])


def nn_unbox(tree):
  import flax.linen as nn
  return nn.meta.unbox(tree)


def test_batchnorm_statistics_train_and_are_used_at_evaluation(tmp_path):
  config = _resnet_config(train_batch_stats=True)
  wd = str(tmp_path / "bn")
  runner.pretrain(config, wd, quiet=True)
  run = runs.load(wd)
  stats = traverse_util.flatten_dict(run.variables["batch_stats"], sep="/")
  means = [v for k, v in stats.items() if k.endswith("mean")]
  variances = [v for k, v in stats.items() if k.endswith("var")]
  assert means and any(np.abs(m).max() > 1e-3 for m in means), "running means never moved from 0"
  assert any(np.abs(v - 1).max() > 1e-3 for v in variances), "running variances never moved from 1"
  _, model = assembly.build(run.config)
  images = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)
  z = model.apply(run.variables, images, method="encode_image")
  reset = {**run.variables, "batch_stats": traverse_util.unflatten_dict(
      {k: (np.zeros_like(v) if k.endswith("mean") else np.ones_like(v)) for k, v in stats.items()}, sep="/")}
  z_reset = model.apply(reset, images, method="encode_image")
  assert not np.allclose(z, z_reset, atol=1e-4), "evaluation ignores the running statistics"


def test_batch_statistics_are_those_of_the_global_batch():
  """Under jit, the batch of a step sharded over 8 devices gives the same BatchNorm update as on one device:
  the statistics are the global batch's (synchronised BatchNorm)."""
  config = _resnet_config(train_batch_stats=True)
  config.model.text.update(vocab_size=70, max_len=24)
  model = assembly.model_of(config)
  images = np.random.default_rng(1).standard_normal((16, 32, 32, 3)).astype(np.float32)
  batch = {"image": images, "text": np.ones((16, 24), np.int32)}
  variables = nn_unbox(model.init({"params": jax.random.key(0)}, batch))

  def update(v, b):
    return model.apply(v, b, train=True, mutable=["batch_stats"])[1]["batch_stats"]

  single = jax.jit(update)(variables, batch)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded_batch = jax.device_put(batch, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  with jax.set_mesh(mesh):
    sharded = jax.jit(update)(variables, sharded_batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), single, sharded)
  one_row = jax.jit(update)(variables, jax.tree.map(lambda x: x[:2], batch))
  assert not np.allclose(jax.tree.leaves(one_row)[0], jax.tree.leaves(single)[0])  # the batch matters


def test_fingerprint_changes_with_the_weights(tmp_path):
  wd = str(tmp_path / "run")
  runner.pretrain(th.micro_config(total_steps=1), wd, quiet=True)
  before = runs.fingerprint(wd)
  assert before == runs.fingerprint(os.path.join(wd, "checkpoints", "1")) and len(before) == 64
  victim = _largest_file(os.path.join(wd, "checkpoints", "1", "state"))
  with open(victim, "r+b") as f:
    f.seek(0)
    byte = f.read(1)
    f.seek(0)
    f.write(bytes([byte[0] ^ 1]))
  assert runs.fingerprint(wd) != before


def test_plain_and_model_run_config():
  assert config_lib.plain(None) == {} and config_lib.plain(ml_collections.ConfigDict({"a": 1})) == {"a": 1}
  c = config_lib.model_run_config({"model": {"logit_bias_init": -10.0}, "tokenizer": {"name": "words"},
                                   "data": {"image_size": 32}})
  assert dict(c.objectives) == {"siglip": 1.0} and c.data.image_size == 32 and "optimizer" in c
  with pytest.raises(ValueError, match="missing"):
    config_lib.model_run_config({"model": {}})


def test_frozen_weights_by_reference(tmp_path):
  """`checkpoint_frozen=False`: checkpoints hold no frozen weights; readers rebuild them from the (fingerprinted)
  init source; resume equals an uninterrupted run; a changed base model is refused."""
  import orbax.checkpoint as ocp
  src = str(tmp_path / "base")
  runner.pretrain(th.micro_config(total_steps=2), src, quiet=True)

  def lit(total):  # a constant learning rate: a run to step 2 then 4 is the run to 4, cut in two
    c = th.micro_config(total_steps=total, frozen="^img/", checkpoint_frozen=False, checkpoint_every_steps=2)
    c.optimizer.schedule, c.optimizer.warmup_steps = "constant", 0
    c.init.checkpoint, c.init.params = src, "^img/"
    return c

  ref = str(tmp_path / "ref")
  runner.pretrain(lit(4), ref, quiet=True)
  wd = str(tmp_path / "run")
  runner.pretrain(lit(2), wd, quiet=True)
  runner.pretrain(lit(4), wd, quiet=True)  # resumes from step 2, rebuilding the frozen tower from the source
  assert th.losses(wd) == th.losses(ref)
  tree = ocp.PyTreeCheckpointer().metadata(os.path.join(wd, "checkpoints", "4", "state")).item_metadata.tree
  assert not tree.get("frozen") and "img" not in tree["params"]
  loaded = traverse_util.flatten_dict(runs.load_variables(wd)["params"], sep="/")
  base = traverse_util.flatten_dict(runs.load_variables(src)["params"], sep="/")
  img = [k for k in loaded if k.startswith("img/")]
  assert img and all(np.array_equal(loaded[k], base[k]) for k in img)
  assert any(not np.array_equal(loaded[k], base[k]) for k in loaded if k.startswith("txt/"))
  victim = _largest_file(os.path.join(src, "checkpoints", "2", "state"))
  with open(victim, "ab") as f:
    f.write(b"\0")
  with pytest.raises(UserError, match="changed since this run started"):
    runs.load_variables(wd)
  with pytest.raises(UserError, match="changed since this run started"):
    runner.pretrain(lit(6), wd, quiet=True)
