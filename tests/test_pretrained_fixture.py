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
