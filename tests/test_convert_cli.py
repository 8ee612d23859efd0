"""`python -m vlm_jax.convert`: import and export flows, one-line user errors (exit 2), and the converted directory
used by `python -m vlm_jax.evaluate --checkpoint=DIR`; with the interop extra, an open_clip model converted end
to end through the command line matches open_clip's encoders."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from flax import traverse_util

from tests import train_helpers as th
from tests.test_inference import converted
from vlm_jax import convert, interop
from vlm_jax import config_lib as cb


@pytest.fixture(scope="module")
def micro():
  return converted(cb.micro_model())


CALLS = []


def fake_from_open_clip(path, arch=None):
  """Stands in for `interop.open_clip.from_open_clip` (no torch needed): the micro model, with no
  `image_size` option, so `interop.convert` resizes with `with_image_size`."""
  CALLS.append((path, arch))
  return converted(cb.micro_model())


@pytest.fixture
def fake_source(monkeypatch):
  CALLS.clear()
  monkeypatch.setitem(interop.SOURCES, "open_clip", ("tests.test_convert_cli", "fake_from_open_clip"))
  return CALLS


def fake_to_open_clip(config, variables):
  """Stands in for `interop.open_clip.to_open_clip`: '.'-joined names, numpy arrays."""
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(variables["params"], sep=".").items()}


def _user_error(capsys, argv, fragment):
  with pytest.raises(SystemExit) as e:
    convert.main(argv)
  assert e.value.code == 2
  lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
  return lines[0]


def test_import_writes_a_checkpoint_and_prints_next_steps(fake_source, micro, tmp_path, capsys):
  src = tmp_path / "model.pt"
  src.write_bytes(b"weights")
  out = tmp_path / "converted"
  convert.main(["--source", "open_clip", "--arch", "ViT-X", "--input", str(src), "--output", str(out),
                "--image_size", "24"])
  printed = capsys.readouterr().out
  assert fake_source == [(str(src), "ViT-X")]
  assert "python -m vlm_jax.evaluate" in printed and f"I.load('{out}')" in printed
  config, variables = interop.load_converted(str(out))
  assert config.data.image_size == 24 and config.model.image.image_size == 24
  assert config.source.format == "test" and config.source.arch == "micro"  # the converter's provenance wins
  assert config.source.file == str(src) and config.source.image_size == 24
  pos = variables["params"]["img"]["pos_embedding"]
  assert pos.shape == (1, 36, 32) and micro[1]["params"]["img"]["pos_embedding"].shape == (1, 16, 32)


@pytest.mark.parametrize("argv,fragment", [
    (["--source", "open_clip", "--input", "/nonexistent/m.pt", "--output", "OUT"], "does not exist"),
    (["--source", "caffe", "--input", "x", "--output", "OUT"], "invalid choice: 'caffe'"),
    (["--input", "x", "--output", "OUT"], "give --source FORMAT"),
    (["--source", "hf", "--to", "hf", "--input", "x", "--output", "OUT"], "not both"),
    (["--source", "hf", "--input", "x"], "--output is required"),
    (["--to", "open_clip", "--arch", "RN50", "--input", "x", "--output", "y.pt"], "only apply to an import"),
    (["--source", "open_clip", "--input", "x", "--output", "OUT", "--image_size", "abc"], "invalid int"),
])
def test_command_line_mistakes_exit_2_with_one_line(argv, fragment, capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "x").write_bytes(b"")
  _user_error(capsys, argv, fragment)


def test_input_and_output_mistakes(fake_source, tmp_path, capsys):
  not_a_run = tmp_path / "empty"
  not_a_run.mkdir()
  _user_error(capsys, ["--to", "open_clip", "--input", str(not_a_run), "--output", str(tmp_path / "m.pt")],
              "no vlm_jax checkpoint found")
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "file").write_text("x")
  _user_error(capsys, ["--source", "open_clip", "--input", str(busy / "file"), "--output", str(busy)],
              "not empty")
  assert not fake_source  # refused before converting
  _user_error(capsys, ["--source", "open_clip", "--input", str(busy / "file"), "--output", str(tmp_path / "o"),
                       "--tokenizer_file", str(busy / "file")], "takes no --tokenizer_file")


def test_source_format_checks(tmp_path):
  f = tmp_path / "m.pt"
  f.write_bytes(b"")
  with pytest.raises(interop.UserError, match="is a directory"):
    interop.convert("hf", str(f))
  with pytest.raises(interop.UserError, match="is a file"):
    interop.convert("open_clip", str(tmp_path))
  with pytest.raises(interop.UserError, match="leave it out"):
    interop.convert("hf", str(tmp_path), arch="ViT-B-32")
  with pytest.raises(interop.UserError, match="unknown source"):
    interop.convert("caffe", str(f))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_export_writes_a_state_dict_file(suffix, micro, tmp_path, monkeypatch, capsys):
  if suffix == ".pt":
    torch = pytest.importorskip("torch")
  else:
    pytest.importorskip("safetensors")
  monkeypatch.setitem(interop.EXPORTERS, "open_clip", ("tests.test_convert_cli", "fake_to_open_clip"))
  run = interop.save_converted(str(tmp_path / "run"), *micro)
  out = tmp_path / f"model{suffix}"
  convert.main(["--to", "open_clip", "--input", run, "--output", str(out)])
  assert "exported" in capsys.readouterr().out
  if suffix == ".pt":
    got = {k: v.numpy() for k, v in torch.load(out, weights_only=True).items()}
  else:
    from safetensors.numpy import load_file
    got = load_file(str(out))
  want = fake_to_open_clip(*micro)
  assert got.keys() == want.keys()
  assert [k for k in want if not np.array_equal(got[k], want[k])] == []


def test_evaluate_cli_runs_on_a_converted_checkpoint(micro, tmp_path):
  out = interop.save_converted(str(tmp_path / "converted"), *micro)
  r = th.run_cli([sys.executable, "-m", "vlm_jax.evaluate", "--config=configs/eval/synthetic.py:micro",
                  f"--checkpoint={out}", "--config.evals.fewshot.shots=(1,)"], timeout=400)
  assert r.returncode == 0, r.stderr[-3000:]
  metrics = json.loads([ln for ln in r.stdout.splitlines() if ln.strip()][-1])
  assert metrics["step"] == 0 and 0.0 <= metrics["zeroshot/top1"] <= 1.0
  assert os.path.exists(os.path.join(out, "eval", "synthetic.json"))


def test_module_entry_point_reports_one_line():
  r = th.run_cli([sys.executable, "-m", "vlm_jax.convert", "--source", "caffe", "--input", "x", "--output", "y"])
  assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.interop
def test_open_clip_model_converted_on_the_command_line_matches(tmp_path):
  """A tiny random open_clip ViT CLIP, saved as a state dict, through `python -m vlm_jax.convert`:
  `vlm_jax.inference` encoders equal open_clip's to 1e-4, and `--to open_clip` gives the state dict back
  bit for bit."""
  torch = pytest.importorskip("torch")
  open_clip = pytest.importorskip("open_clip")
  pytest.importorskip("safetensors")
  from vlm_jax import inference
  cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8,
                                         "head_width": 32},
         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
  arch = tmp_path / "tiny-vit.json"
  arch.write_text(json.dumps(cfg))
  torch.manual_seed(0)
  model = open_clip.CLIP(**cfg).eval()
  with torch.no_grad():  # move every tensor off its init (zero biases, unit norms) so every mapping matters
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  torch.save(model.state_dict(), tmp_path / "tiny.pt")
  out = tmp_path / "converted"
  r = th.run_cli([sys.executable, "-m", "vlm_jax.convert", "--source", "open_clip", "--arch", str(arch),
                  "--input", str(tmp_path / "tiny.pt"), "--output", str(out)])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "next:" in r.stdout

  m = inference.load(str(out))
  x = np.random.default_rng(0).standard_normal((3, 32, 32, 3)).astype(np.float32)
  texts = ["a photo of a cat", "a diagram of a transformer", "hello world!"]
  with torch.no_grad():
    want_img = model.encode_image(torch.from_numpy(x).permute(0, 3, 1, 2), normalize=True).numpy()
    want_txt = model.encode_text(open_clip.tokenize(texts), normalize=True).numpy()
  np.testing.assert_allclose(m.encode_image(x), want_img, atol=1e-4)
  np.testing.assert_allclose(m.encode_text(texts), want_txt, atol=1e-4)
  assert m.logit_scale == pytest.approx(model.logit_scale.exp().item(), rel=1e-6) and m.logit_bias is None

  convert.main(["--to", "open_clip", "--input", str(out), "--output", str(tmp_path / "back.safetensors")])
  from safetensors.torch import load_file
  back, original = load_file(str(tmp_path / "back.safetensors")), model.state_dict()
  assert set(back) == set(original)
  assert [k for k in original if not torch.equal(back[k], original[k])] == []


def test_failed_hf_export_leaves_no_directory(micro, tmp_path, capsys):
  """The micro model (ViT with 'gap' pooling) has no Hugging Face CLIPModel layout: one-line error, no output."""
  run = interop.save_converted(str(tmp_path / "run"), *micro)
  _user_error(capsys, ["--to", "hf", "--input", run, "--output", str(tmp_path / "hf")], "")
  assert not os.path.exists(tmp_path / "hf")
