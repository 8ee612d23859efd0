"""Fault 6: hostile files. A pickle payload in a torch weight file is refused and never runs; tar members with
escaping names, links or device types are read as data or skipped and counted, never written to disk;
decompression bombs are skipped and counted without allocating their pixels; a safetensors header that lies
about sizes or offsets is one `error:` line. No torch needed: the hostile files are written with the stdlib.
"""

from __future__ import annotations

import collections
import importlib.util
import io
import os
import pickle
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
from PIL import Image

from tests import shard_fixtures as fx
from tests.faults import hostile_data as hd
from vlm_jax import convert
from vlm_jax.data import pipeline, shards
from vlm_jax.data.tokenizers import get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOK = get_tokenizer("bytes", context_length=8)


def _convert_refuses(capsys, argv: list[str]) -> str:
  """Runs `python -m vlm_jax.convert ARGV` in-process; asserts exit 2 with exactly one `error:` line. With torch
  installed (`make test-interop` runs the tests marked `interop`), the file must have reached torch's reader
  and been refused there, not turned away for want of torch."""
  with pytest.raises(SystemExit) as e:
    convert.convert(argv)
  err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
  assert e.value.code == 2, err
  assert len(err) == 1 and err[0].startswith("error: "), err
  if importlib.util.find_spec("torch") is not None:
    assert "needs PyTorch" not in err[0], err[0]
  return err[0]


def _tree(root) -> set[str]:
  return {os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files} | {
      os.path.relpath(os.path.join(d, x), root) + "/" for d, dirs, _ in os.walk(root) for x in dirs}


# ---- (a) a pickle payload in a .pt / .bin file ------------------------------------------------------------------

def test_the_payload_is_real(tmp_path):
  """Control: plain unpickling of the same bytes does run the payload (so its absence below means something)."""
  marker = tmp_path / "CONTROL"
  pickle.loads(hd.evil_pickle(str(marker)))  # noqa: S301 (on purpose: the control)
  assert marker.exists()


@pytest.mark.interop  # also with torch installed: torch.load(weights_only=True) is what refuses these
@pytest.mark.parametrize("layout", ["legacy.pt", "legacy.bin", "zip.pt", "torchscript.pt"])
@pytest.mark.parametrize("source", ["open_clip", "openai"])
def test_pickle_payload_is_refused_and_never_runs(tmp_path, capsys, layout, source):
  marker = tmp_path / "MARKER"
  path = hd.write_evil_torch_files(str(tmp_path), str(marker))[layout]
  line = _convert_refuses(capsys, ["--source", source, "--input", path, "--output", str(tmp_path / "out")])
  print(f"{source} {layout}: {line[:160]}")
  assert not marker.exists(), "the pickle payload ran"
  assert not (tmp_path / "out").exists()


@pytest.mark.interop
def test_pickle_payload_in_a_hugging_face_directory(tmp_path, capsys):
  marker = tmp_path / "MARKER"
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text('{"model_type": "clip"}')
  (hf / "pytorch_model.bin").write_bytes(hd.evil_pickle(str(marker)))
  _convert_refuses(capsys, ["--source", "hf", "--input", str(hf), "--output", str(tmp_path / "out")])
  assert not marker.exists()


@pytest.mark.interop
@pytest.mark.parametrize("damage", ["empty", "random_bytes", "cut_zip", "zip_without_data_pkl"])
def test_cut_or_malformed_torch_file_is_one_error_line(tmp_path, capsys, damage):
  """Not hostile, just broken: torch.load's RuntimeError / EOFError on these is a one-line error too."""
  good = hd.write_evil_torch_files(str(tmp_path), str(tmp_path / "MARKER"))["zip.pt"]
  data = open(good, "rb").read()
  path = tmp_path / "broken.pt"
  if damage == "zip_without_data_pkl":
    import zipfile  # noqa: PLC0415
    with zipfile.ZipFile(path, "w") as z:
      z.writestr("archive/version", "3\n")
  else:
    path.write_bytes({"empty": b"", "random_bytes": np.random.default_rng(0).bytes(3000), "cut_zip": data[:len(data) // 2]}[damage])
  _convert_refuses(capsys, ["--source", "open_clip", "--input", str(path), "--output", str(tmp_path / "out")])
  assert not (tmp_path / "MARKER").exists()


# ---- (d) a safetensors header that lies ---------------------------------------------------------------------------

@pytest.mark.interop  # safetensors comes with the interop extra: `make test-interop` runs these
@pytest.mark.parametrize("lie", sorted(hd.LYING_SAFETENSORS))
def test_lying_safetensors_header_is_one_error_line(tmp_path, capsys, lie):
  pytest.importorskip("safetensors")
  path = tmp_path / "model.safetensors"
  path.write_bytes(hd.LYING_SAFETENSORS[lie])
  line = _convert_refuses(capsys, ["--source", "open_clip", "--input", str(path), "--output", str(tmp_path / "o")])
  assert "not a valid safetensors file" in line, line
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text('{"model_type": "clip"}')
  (hf / "model.safetensors").write_bytes(hd.LYING_SAFETENSORS[lie])
  line = _convert_refuses(capsys, ["--source", "hf", "--input", str(hf), "--output", str(tmp_path / "o")])
  print(f"{lie}: {line[:160]}")
  assert "not a valid safetensors file" in line, line


# ---- (b) tar members: escaping names, links, devices ----------------------------------------------------------------

def test_tar_links_devices_and_escaping_names_are_never_written(tmp_path, monkeypatch):
  """Absolute and `..` names are read as keys (data); symlink, hard-link, character / block device and FIFO
  members make their sample a counted `special_member` skip and are never read or followed; directory members are
  ignored. Nothing appears on disk: not under the working directory, its parents, nor at the absolute name."""
  work, outside = tmp_path / "work", tmp_path / "outside"
  work.mkdir()
  outside.mkdir()
  monkeypatch.chdir(work)
  png = fx.image_bytes(1)
  shard = work / "hostile.tar"
  with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as t:
    hd.add_file(t, "ok0.png", png)
    hd.add_file(t, "ok0.txt", b"valid zero")
    hd.add_file(t, f"{outside}/abs.png", png)                          # absolute name: a key, not a path
    hd.add_file(t, f"{outside}/abs.txt", b"absolute name")
    hd.add_file(t, "../../dotdot.png", png)                            # escaping name: a key
    hd.add_file(t, "../../dotdot.txt", b"dotdot name")
    hd.add_special(t, "sym.png", "symlink", "/etc/passwd")             # 1 special_member
    hd.add_file(t, "sym.txt", b"symlinked image")
    hd.add_file(t, "symcap.png", png)                                  # 2 (the caption is the link)
    hd.add_special(t, "symcap.txt", "symlink", "../../../etc/hostname")
    hd.add_special(t, "hard.png", "hardlink", "ok0.png")               # 3
    hd.add_file(t, "hard.txt", b"hard-linked image")
    hd.add_special(t, "chr.png", "chardev")                            # 4
    hd.add_file(t, "chr.txt", b"character device")
    hd.add_special(t, "blk.png", "blockdev")                           # 5
    hd.add_file(t, "blk.txt", b"block device")
    hd.add_special(t, "fifo.png", "fifo")                              # 6
    hd.add_file(t, "fifo.txt", b"fifo")
    hd.add_special(t, f"{outside}/lonely", "symlink", "/")             # 7: a sample of one link member
    hd.add_special(t, "somedir", "dir")                                # ignored
    hd.add_file(t, "somedir/ok1.png", png)
    hd.add_file(t, "somedir/ok1.txt", b"valid one")
  before_work, before_outside, before_tmp = _tree(work), _tree(outside), _tree(tmp_path)

  items = [it for it, _ in shards.read_shard(str(shard))]
  samples = [it for it in items if isinstance(it, shards.Sample)]
  skips = collections.Counter(it.reason for it in items if isinstance(it, shards.Skip))
  assert sorted(s.caption for s in samples) == ["absolute name", "dotdot name", "valid one", "valid zero"]
  assert {s.key for s in samples} >= {f"{outside}/abs", "../../dotdot"}
  assert skips == {"special_member": 7}

  it = pipeline.make_train_iterator({"shards": str(shard), "image_size": 16, "shuffle_buffer": 0,
                                     "cycle_length": 1}, global_batch_size=4, seed=0, tokenizer=TOK)
  next(it)
  assert it.stats()["data/skipped/special_member"] == 7
  assert _tree(work) == before_work and _tree(outside) == before_outside and _tree(tmp_path) == before_tmp
  assert not os.path.exists(tmp_path.parent / "dotdot.png") and not os.path.lexists(outside / "lonely")


# ---- (c) decompression bombs ----------------------------------------------------------------------------------------

MAX = Image.MAX_IMAGE_PIXELS  # 89,478,485 (Pillow's default); Pillow itself raises only above 2 × MAX

BOMBS = {
    "png_declares_30000x30000": lambda: hd.png_declaring(30000, 30000),   # lying header, 2.7 GB as RGB
    "jpeg_declares_60000x60000": lambda: hd.jpeg_declaring(60000, 60000),  # lying header, 10.8 GB as RGB
    "png_bomb_20000x20000": lambda: hd.png_bomb(20000, 20000),            # a real bomb, 400 M pixels
    "png_bomb_10000x10000": lambda: hd.png_bomb(10000, 10000),            # 100 M pixels: Pillow only warns
}


def _bomb_shard(path: str) -> list[int]:
  """good, bomb, good, bomb, …, good; returns the bomb file sizes."""
  sizes = []
  with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
    for i, (name, make) in enumerate(BOMBS.items()):
      hd.add_file(t, f"good{i}.png", fx.image_bytes(i))
      hd.add_file(t, f"good{i}.txt", f"good {i}".encode())
      data = make()
      sizes.append(len(data))
      hd.add_file(t, f"{name}.png", data)
      hd.add_file(t, f"{name}.txt", name.encode())
    hd.add_file(t, "last.png", fx.image_bytes(99))
    hd.add_file(t, "last.txt", b"last")
  return sizes


_PEAK = textwrap.dedent("""
    def status(field):  # kB, from /proc/self/status (Linux)
      with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(field + ":"))
    def reset_peak():  # the peak so far (e.g. while importing) would hide a smaller allocation
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
""")

_MEASURE = _PEAK + textwrap.dedent("""
    import json, resource, sys
    from vlm_jax.data import pipeline
    from vlm_jax.data.tokenizers import get_tokenizer
    tok = get_tokenizer("bytes", context_length=8)
    data = {"shards": sys.argv[1], "image_size": 16, "shuffle_buffer": 0, "cycle_length": 1}
    it = pipeline.make_train_iterator(data, global_batch_size=1, seed=0, tokenizer=tok)
    next(it)  # the first valid sample: imports and buffers warm
    reset_peak()
    before = status("VmRSS")
    for _ in range(4):
      next(it)
    after = status("VmHWM")
    print(json.dumps({"grew_mb": (after - before) / 1024, "peak_mb": after / 1024,
                      "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "skipped": {k: v for k, v in it.stats().items() if v}}))
""")

_CONTROL = _PEAK + textwrap.dedent("""
    import io, json, resource, sys, warnings
    from PIL import Image
    from tests.faults import hostile_data as hd
    data = hd.png_bomb(10000, 10000)
    reset_peak()
    before = status("VmRSS")
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      Image.open(io.BytesIO(data)).load()  # what an unguarded decoder does with it
    after = status("VmHWM")
    print(json.dumps({"grew_mb": (after - before) / 1024}))
""")


def _run(script: str, *args: str) -> dict:
  import json  # noqa: PLC0415
  r = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                     env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-2000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak-RSS reset needs Linux /proc")
def test_decompression_bombs_are_skipped_counted_and_never_allocated(tmp_path):
  """Each bomb is refused from its header and counted as `decompression_bomb`; peak RSS of the reading process
  (VmHWM, reset before reading) grows by far less than the smallest bomb's pixels (100 MB as 8-bit gray), while
  the control — Pillow decoding that bomb unguarded — grows by at least that much."""
  shard = str(tmp_path / "bombs.tar")
  sizes = _bomb_shard(shard)
  got = _run(_MEASURE, shard)
  control = _run(_CONTROL)
  print(f"bomb files {dict(zip(BOMBS, sizes))} bytes; reading them: peak RSS {got['peak_mb']:.0f} MB, grew "
        f"{got['grew_mb']:.1f} MB; unguarded decode of the 10000x10000 one grew {control['grew_mb']:.0f} MB; "
        f"skipped {got['skipped']}")
  assert got["skipped"] == {"data/skipped/decompression_bomb": len(BOMBS)}
  assert control["grew_mb"] >= 80  # the measurement sees the 1e8-byte (95 MiB) allocation
  assert got["grew_mb"] < 30       # declared sizes: 100 MB to 10.8 GB


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_decode_image_refuses_each_bomb_from_its_header(name):
  from vlm_jax.data import transforms  # noqa: PLC0415
  with pytest.raises(Image.DecompressionBombError):
    transforms.decode_image(BOMBS[name](), draft_size=32)


def test_old_checkpoint_skip_counters_resume_with_the_new_reasons_at_zero(tmp_path):
  """A data state saved before `special_member` / `decompression_bomb` existed (10 counters) still resumes."""
  fx.write_clean(str(tmp_path), 2, 4)
  data = {"shards": f"{tmp_path}/clean-*.tar", "image_size": 16, "shuffle_buffer": 0, "cycle_length": 1}
  it = pipeline.make_train_iterator(data, global_batch_size=2, seed=0, tokenizer=TOK)
  next(it)
  state = it.get_state()
  state["skipped"] = [7] + [0] * 9
  it2 = pipeline.make_train_iterator(data, global_batch_size=2, seed=0, tokenizer=TOK)
  it2.set_state(state)
  next(it2)
  stats = it2.stats()
  assert stats["data/skipped/corrupt_image"] == 7 and stats["data/skipped/decompression_bomb"] == 0


def test_the_limit_is_on_the_decoded_size(monkeypatch):
  """A JPEG over the limit that draft mode decodes at 1/8 scale is kept; a PNG of the same size is refused (the
  limit lowered to 1 M pixels so the images stay small)."""
  from vlm_jax.data import transforms  # noqa: PLC0415
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
  img = Image.new("RGB", (1600, 1000), (90, 120, 200))  # 1.6 M pixels
  jpeg, png = io.BytesIO(), io.BytesIO()
  img.save(jpeg, "JPEG")
  img.save(png, "PNG")
  assert transforms.decode_image(jpeg.getvalue(), draft_size=224).size == (400, 250)
  with pytest.raises(Image.DecompressionBombError):
    transforms.decode_image(png.getvalue(), draft_size=224)
