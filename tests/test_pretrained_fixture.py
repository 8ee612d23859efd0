"""The cached pretrained fixtures (tests/pretrained.py) are models that work: zero-shot top-1 on held-out
synthetic images well above chance (1/64), measured here through `vlm_jax.inference.load`; a second call
returns the same directory without retraining."""

import os
import time

import pytest

from tests import pretrained

# seen-pair zero-shot top-1 each fixture must reach; chance is 1/64 ≈ 0.016 (measured: tests/pretrained.py RUNS)
MIN_SEEN_TOP1 = {"resnet": 0.4, "vit": 0.15}


def zeroshot(run_dir: str) -> dict:
  import vlm_jax.inference
  from vlm_jax.evaluate import zeroshot as zs
  m = vlm_jax.inference.load(run_dir)
  return zs.evaluate_synthetic(m.encode_image, m.encode_text, m.tokenizer, data_config=m.config.data,
                               image_size=m.image_size)


@pytest.mark.parametrize("kind", pretrained.KINDS)
def test_fixture_is_a_working_model(kind, request):
  run_dir = request.getfixturevalue(f"pretrained_{kind}")
  assert os.path.isdir(os.path.join(run_dir, "checkpoints"))
  assert os.path.isfile(os.path.join(run_dir, "config.json"))
  m = zeroshot(run_dir)
  info = pretrained.build_info(run_dir)
  print(f"\n{kind} fixture {run_dir}: zero-shot top-1 seen {m['zeroshot/seen_top1']:.3f}, unseen "
        f"{m['zeroshot/unseen_top1']:.3f}, chance {m['zeroshot/chance']:.3f}; build {info}")
  assert m["zeroshot/chance"] == pytest.approx(1 / 64)
  assert m["zeroshot/seen_top1"] >= MIN_SEEN_TOP1[kind]
  assert m["zeroshot/unseen_top1"] > 4 * m["zeroshot/chance"]


@pytest.mark.parametrize("kind", pretrained.KINDS)
def test_second_call_reuses_the_build(kind, request):
  first = request.getfixturevalue(f"pretrained_{kind}")
  stamp = os.path.getmtime(os.path.join(first, "fixture_build.json"))
  t0 = time.perf_counter()
  again = pretrained.pretrained_run(kind)
  assert again == first
  assert time.perf_counter() - t0 < 5.0
  assert os.path.getmtime(os.path.join(again, "fixture_build.json")) == stamp


def test_hash_follows_the_config_and_code(tmp_path, monkeypatch):
  """Another config or another source file gives another directory; the same ones give the same."""
  c = pretrained.config("resnet").to_json_best_effort(sort_keys=True)
  assert pretrained.code_hash(c) == pretrained.code_hash(c)
  assert pretrained.code_hash(c) != pretrained.code_hash(c.replace('"total_steps"', '"total_steps_"'))
  assert pretrained.run_dir("resnet") != pretrained.run_dir("vit")
  (tmp_path / "vlm_jax" / "models").mkdir(parents=True)
  (tmp_path / "vlm_jax" / "models" / "m.py").write_text("x = 1\n")
  monkeypatch.setattr(pretrained, "ROOT", str(tmp_path))
  h1 = pretrained.code_hash(c)
  (tmp_path / "vlm_jax" / "models" / "m.py").write_text("x = 2\n")
  assert pretrained.code_hash(c) != h1


FAKE_BUILD = """
import os, sys, time
sys.path.insert(0, {root!r})
from tests import pretrained
def fake_build(c, workdir, quiet=True):
  with open(os.path.join(os.environ["VLM_JAX_CACHE"], "builds.txt"), "a") as f:
    f.write(f"{{os.getpid()}}\\n")
  time.sleep(2)
  os.makedirs(os.path.join(workdir, "checkpoints", "1"))
  return {{"zeroshot/seen_top1": 0.5}}
pretrained.build = fake_build
print(pretrained.pretrained_run("resnet"))
"""


def test_concurrent_callers_build_once(tmp_path):
  """Processes asking at once (pytest-xdist workers): one builds under the lock, the others wait and reuse it;
  a stale temporary directory of a dead build is removed."""
  import subprocess
  import sys
  env = {**os.environ, "VLM_JAX_CACHE": str(tmp_path)}
  stale = pretrained.run_dir("resnet").replace(pretrained.cache_root(), str(tmp_path / "pretrained")) + ".tmp-1"
  os.makedirs(stale)
  code = FAKE_BUILD.format(root=pretrained.ROOT)
  procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
           for _ in range(3)]
  outs = [p.communicate(timeout=120)[0].strip() for p in procs]
  assert all(p.returncode == 0 for p in procs)
  assert len(set(outs)) == 1 and os.path.isdir(os.path.join(outs[0], "checkpoints", "1"))
  assert len((tmp_path / "builds.txt").read_text().split()) == 1
  assert not os.path.exists(stale)
  assert pretrained.build_info(outs[0])["zeroshot"] == {"zeroshot/seen_top1": 0.5}
