"""The shard tools: make_shards (CSV / TSV / JSONL / image folder → tar shards) and inspect (counts, grid, JSON)."""

from __future__ import annotations

import io
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from tests import shard_fixtures as fx
from tests import train_helpers as th
from vlm_jax.data import inspect as inspect_tool
from vlm_jax.data import make_shards, shards


def _image(path, w=20, h=16, seed=0, fmt=None, smooth=False) -> bytes:
  """Writes a small RGB image (noise, or a smooth gradient that survives JPEG) and returns its file bytes."""
  if smooth:
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 127 // (w + h)], -1)
    arr = arr.astype(np.uint8)
  else:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(arr).save(path, fmt)
  with open(path, "rb") as f:
    return f.read()


def _read(out_dir) -> list[shards.Sample]:
  stats = json.load(open(os.path.join(out_dir, "stats.json")))
  items = [it for s in stats["per_shard"] for it, _ in shards.read_shard(os.path.join(out_dir, s["shard"]))]
  assert all(isinstance(it, shards.Sample) for it in items), items
  return items


def _run(*argv) -> dict:
  return make_shards.main([*map(str, argv), "--processes", "1"])


def _user_error(capsys, fn, argv, fragment):
  with pytest.raises(SystemExit) as e:
    fn(list(map(str, argv)))
  assert e.value.code == 2
  err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
  assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err


# ---- make_shards -----------------------------------------------------------------------------------------------

def test_csv_round_trip_keys_captions_labels_bytes(tmp_path):
  files = {f"imgs/{i}.png": _image(str(tmp_path / f"imgs/{i}.png"), seed=i) for i in range(4)}
  files["imgs/4.jpg"] = _image(str(tmp_path / "imgs/4.jpg"), seed=4)
  files["imgs/5.webp"] = _image(str(tmp_path / "imgs/5.webp"), seed=5)
  rows = [(p, f"caption, number {i}", i % 2) for i, p in enumerate(files)]
  (tmp_path / "captions.csv").write_text("filepath,title,label\n" + "".join(f'{p},"{c}",{lab}\n' for p, c, lab in rows))
  stats = _run("--input", tmp_path / "captions.csv", "--output", tmp_path / "out", "--shard-size", 4)
  assert sorted(os.listdir(tmp_path / "out")) == [
      "data-00000.tar", "data-00001.tar", "stats.json"]
  items = _read(tmp_path / "out")
  assert [it.key for it in items] == ["000000000", "000000001", "000000002", "000000003", "000010000", "000010001"]
  assert [it.caption for it in items] == [c for _, c, _ in rows]
  assert [it.label for it in items] == [lab for _, _, lab in rows]
  assert [it.image for it in items] == list(files.values())  # no --resize: original bytes
  assert [it.image_ext for it in items] == ["png"] * 4 + ["jpg", "webp"]
  assert items[0].meta == {"path": "imgs/0.png", "caption": "caption, number 0", "original_width": 20,
                           "original_height": 16, "width": 20, "height": 16}
  on_disk = json.load(open(tmp_path / "out/stats.json"))
  assert on_disk["samples"] == stats["samples"] == 6 and on_disk["shards"] == 2 and on_disk["skipped"] == {}
  assert on_disk["inputs"] == 6 and stats["pattern"] == f"{tmp_path}/out/data-{{00000..00001}}.tar"


def test_tsv_open_clip_columns_and_custom_names(tmp_path):
  a = _image(str(tmp_path / "a/x.png"), seed=1)
  b = _image(str(tmp_path / "b.png"), seed=2)
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub/train.tsv").write_text(f"title\tfilepath\nfirst\t../a/x.png\nsecond\t{tmp_path}/b.png\n")
  _run("--input", tmp_path / "sub/train.tsv", "--output", tmp_path / "o1", "--no-meta")
  items = _read(tmp_path / "o1")
  assert [(it.caption, it.image, it.label, it.meta) for it in items] == [
      ("first", a, -1, None), ("second", b, -1, None)]
  (tmp_path / "c.csv").write_text("img,desc,title\na/x.png,custom,ignored\n")
  _run("--input", tmp_path / "c.csv", "--output", tmp_path / "o2", "--image-column", "img",
       "--caption-column", "desc", "--prefix", "mine")
  assert os.path.exists(tmp_path / "o2/mine-00000.tar")
  assert [(it.caption, it.image) for it in _read(tmp_path / "o2")] == [("custom", a)]


def test_jsonl_with_labels_and_exact_skips(tmp_path):
  good = [_image(str(tmp_path / f"i{i}.png"), seed=i) for i in range(3)]
  lines = [
      json.dumps({"image": "i0.png", "caption": "zero", "label": 3}),
      "{not json",                                               # bad_line
      json.dumps(["i0.png", "a list"]),                          # bad_line
      json.dumps({"image": "i1.png"}),                           # missing_caption
      json.dumps({"image": "https://x.org/a.jpg", "caption": "url"}),  # not_local_path
      json.dumps({"caption": "no image"}),                       # missing_image
      json.dumps({"image": "i1.png", "caption": "x", "label": "dog"}),  # bad_label
      json.dumps({"image": "i1.png", "caption": "one"}),
      "",
      json.dumps({"image": "i2.png", "caption": "two", "label": "7"}),
  ]
  (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
  stats = _run("--input", tmp_path / "d.jsonl", "--output", tmp_path / "out")
  items = _read(tmp_path / "out")
  assert [(it.caption, it.label, it.image) for it in items] == [("zero", 3, good[0]), ("one", -1, good[1]),
                                                                ("two", 7, good[2])]
  assert stats["skipped"] == {"bad_line": 2, "missing_caption": 1, "not_local_path": 1, "missing_image": 1,
                              "bad_label": 1}
  assert stats["inputs"] == 9 and stats["samples"] == 3


def test_image_folder_classes_captions_labels(tmp_path):
  root = tmp_path / "train"
  want = {}
  for cls, n in (("golden_retriever", 2), ("cat", 1), ("zebra", 2)):
    for i in range(n):
      want[f"{cls}/{i}.png"] = _image(str(root / cls / f"{i}.png"), seed=len(want))
  _image(str(root / "cat/nested/deep.png"), seed=9)
  (root / "cat/notes.txt").write_text("not an image")
  (root / "cat/.hidden.png").write_bytes(b"ignored")
  (root / "README").write_text("a file at the top level")
  stats = _run("--input", root, "--output", tmp_path / "out", "--shard-size", 2)
  items = _read(tmp_path / "out")
  order = ["cat/0.png", "cat/nested/deep.png", "golden_retriever/0.png", "golden_retriever/1.png",
           "zebra/0.png", "zebra/1.png"]
  assert [it.meta["path"] for it in items] == order
  assert [it.caption for it in items] == ["cat", "cat", "golden retriever", "golden retriever", "zebra", "zebra"]
  assert [it.label for it in items] == [0, 0, 1, 1, 2, 2]
  assert [it.image for it in items[2:]] == [want[p] for p in order[2:]]
  assert stats["classes"] == ["cat", "golden_retriever", "zebra"] and stats["shards"] == 3
  assert json.load(open(tmp_path / "out/stats.json"))["classes"] == stats["classes"]


def test_resize_shrinks_only_larger_images_and_converts_other_formats(tmp_path):
  big_png = _image(str(tmp_path / "big.png"), w=60, h=40, smooth=True)
  tall_jpg = _image(str(tmp_path / "tall.jpg"), w=30, h=50, smooth=True)
  small_jpg = _image(str(tmp_path / "small.jpg"), w=20, h=16, seed=3)
  _image(str(tmp_path / "pic.bmp"), w=12, h=10, smooth=True)
  (tmp_path / "c.csv").write_text("image,caption\nbig.png,big\ntall.jpg,tall\nsmall.jpg,small\npic.bmp,bmp\n")
  stats = _run("--input", tmp_path / "c.csv", "--output", tmp_path / "out", "--resize", 20)
  items = _read(tmp_path / "out")
  assert [it.image_ext for it in items] == ["jpg", "jpg", "jpg", "jpg"]
  decoded = [Image.open(io.BytesIO(it.image)) for it in items]
  assert [d.format for d in decoded] == ["JPEG"] * 4
  assert [d.size for d in decoded] == [(30, 20), (20, 33), (20, 16), (12, 10)]
  assert items[2].image == small_jpg and items[1].image != tall_jpg  # not resized: the original bytes
  assert (items[0].meta["original_width"], items[0].meta["width"]) == (60, 30)
  assert stats["resized"] == 2 and stats["converted"] == 1 and stats["resize"] == 20
  # the stored pixels are the bicubic resize of the original (up to JPEG q95 loss)
  ref = np.asarray(Image.open(io.BytesIO(big_png)).convert("RGB").resize((30, 20), Image.BICUBIC), np.float32)
  assert np.abs(np.asarray(decoded[0].convert("RGB"), np.float32) - ref).mean() < 3.0
  ref = np.asarray(Image.open(tmp_path / "pic.bmp").convert("RGB"), np.float32)
  assert np.abs(np.asarray(decoded[3].convert("RGB"), np.float32) - ref).mean() < 3.0


def test_bad_inputs_are_skipped_and_counted_exactly(tmp_path):
  ok = [_image(str(tmp_path / f"ok{i}.png"), seed=i) for i in range(2)]
  png = _image(str(tmp_path / "whole.png"), seed=5)
  (tmp_path / "truncated.png").write_bytes(png[: len(png) // 2])
  (tmp_path / "text.jpg").write_bytes(b"not an image at all")
  (tmp_path / "zero.png").write_bytes(b"")
  (tmp_path / "folder.png").mkdir()
  (tmp_path / "c.csv").write_bytes(
      b"filepath,caption\n"
      b"ok0.png,first\n"
      b"missing.png,no such file\n"        # missing_file
      b"folder.png,a directory\n"          # missing_file
      b"truncated.png,cut in half\n"       # corrupt_image
      b"text.jpg,text bytes\n"             # corrupt_image
      b"zero.png,zero bytes\n"             # corrupt_image
      b"whole.png,   \n"                   # empty_caption
      b"whole.png\n"                       # missing_caption (short row)
      b",no path\n"                        # missing_image
      b"whole.png,bad \xff\xfe utf-8\n"    # bad_text
      b"ok1.png,last\n")
  stats = _run("--input", tmp_path / "c.csv", "--output", tmp_path / "out")
  assert stats["skipped"] == {"missing_file": 2, "corrupt_image": 3, "empty_caption": 1, "missing_caption": 1,
                              "missing_image": 1, "bad_text": 1}
  assert stats["inputs"] == 11 and stats["samples"] == 2
  assert [(it.caption, it.image) for it in _read(tmp_path / "out")] == [("first", ok[0]), ("last", ok[1])]


def test_worker_processes_write_identical_shards(tmp_path):
  for i in range(6):
    _image(str(tmp_path / f"{i}.png"), w=40, h=30, seed=i)
  (tmp_path / "c.csv").write_text("path,text\n" + "".join(f"{i}.png,image {i}\n" for i in range(6)) + "gone.png,x\n")
  common = ["--input", str(tmp_path / "c.csv"), "--resize", "24", "--shard-size", "4"]
  one = make_shards.main([*common, "--output", str(tmp_path / "p1"), "--processes", "1"])
  two = make_shards.main([*common, "--output", str(tmp_path / "p2"), "--processes", "2"])
  assert one["skipped"] == two["skipped"] == {"missing_file": 1}
  for name in ("data-00000.tar", "data-00001.tar"):
    assert (tmp_path / "p1" / name).read_bytes() == (tmp_path / "p2" / name).read_bytes()


def test_overwrite_replaces_old_shards(tmp_path, capsys):
  for i in range(3):
    _image(str(tmp_path / f"{i}.png"), seed=i)
  (tmp_path / "c.csv").write_text("image,caption\n" + "".join(f"{i}.png,c{i}\n" for i in range(3)))
  _run("--input", tmp_path / "c.csv", "--output", tmp_path / "out", "--shard-size", 1)
  _user_error(capsys, make_shards.main, ["--input", tmp_path / "c.csv", "--output", tmp_path / "out"],
              "already holds 3 shard(s)")
  _run("--input", tmp_path / "c.csv", "--output", tmp_path / "out", "--overwrite")
  assert sorted(os.listdir(tmp_path / "out")) == ["data-00000.tar", "stats.json"]
  assert [it.caption for it in _read(tmp_path / "out")] == ["c0", "c1", "c2"]


# ---- inspect ---------------------------------------------------------------------------------------------------

def test_inspect_counts_clean_and_dirty_shards_exactly(tmp_path, capsys):
  d = str(tmp_path)
  fx.write_clean(d, 2, 3)
  n_dirty = fx.write_dirty(f"{d}/clean-dirty.tar")
  captions = [f"sample {i}" for i in range(6)] + [f"good {i}" for i in range(n_dirty)]
  result = inspect_tool.main([f"{d}/clean-*.tar", "--samples", "5"])
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert json.loads(last) == result
  assert result["samples"] == 6 + n_dirty and result["shards"] == 3
  assert result["skipped"] == {**fx.DIRTY_READER_SKIPS, **fx.DIRTY_DECODE_SKIPS}
  chars = [len(c) for c in captions]
  assert result["captions"]["words"] == {"min": 2, "mean": 2.0, "median": 2.0, "p95": 2.0, "max": 2}
  assert result["captions"]["chars"]["max"] == max(chars) and result["captions"]["chars"]["mean"] == round(
      float(np.mean(chars)), 2)
  assert result["labels"]["labeled"] == 6 + n_dirty  # every valid sample of both fixtures has a .cls label
  assert result["grid"] == f"{d}/inspect_grid.png"
  with open(result["grid"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  limited = inspect_tool.main([f"{d}/clean-{{00000..00001}}.tar", "--limit", "4", "--grid", f"{d}/g.png"])
  assert (limited["samples"], limited["shards"], limited["grid"]) == (4, 2, f"{d}/g.png")


def test_inspect_reads_make_shards_output(tmp_path, capsys):
  root = tmp_path / "folder"
  for cls in ("a_b", "c"):
    for i in range(2):
      _image(str(root / cls / f"{i}.png"), w=30, h=20, seed=i)
  stats = _run("--input", root, "--output", tmp_path / "out")
  result = inspect_tool.main([stats["pattern"], "--samples", "0"])
  assert result["samples"] == 4 and result["skipped"] == {} and result["grid"] is None
  assert result["labels"] == {"labeled": 4, "distinct": 2, "top": [[0, 2], [1, 2]]}
  assert result["image_shorter_side"]["max"] == 20
  assert result["captions"]["words"]["max"] == 2  # 'a b'


# ---- user errors -----------------------------------------------------------------------------------------------

def test_cli_error_is_one_line_exit_2_in_a_subprocess(tmp_path):
  r = th.run_cli([sys.executable, "-m", "vlm_jax.data.make_shards", "--input", str(tmp_path / "none.csv"),
                  "--output", str(tmp_path / "out")], timeout=60)
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines() == [f"error: --input {tmp_path}/none.csv: no such file or folder"]
  r = th.run_cli([sys.executable, "-m", "vlm_jax.data.inspect", str(tmp_path / "x-*.tar")], timeout=60)
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: no shard matches '{tmp_path}/x-*.tar'"]


def _make_error_inputs(tmp_path):
  _image(str(tmp_path / "i.png"))
  (tmp_path / "notes.txt").write_text("i.png,caption\n")
  (tmp_path / "nocol.csv").write_text("file,caption\ni.png,x\n")
  (tmp_path / "good.csv").write_text("image,caption\ni.png,x\n")
  (tmp_path / "empty.csv").write_text("")
  (tmp_path / "header.csv").write_text("image,caption\n")
  (tmp_path / "allbad.csv").write_text("image,caption\nmissing.png,x\n")
  (tmp_path / "noclasses").mkdir()
  (tmp_path / "noimages/cls").mkdir(parents=True)
  (tmp_path / "noimages/cls/readme.txt").write_text("x")


@pytest.mark.parametrize("args,fragment", [
    (["--output", "{d}/o"], "--input"),
    (["--input", "{d}/notes.txt", "--output", "{d}/o"], "expected a .csv, .tsv or .jsonl"),
    (["--input", "{d}/nocol.csv", "--output", "{d}/o"], "no image column (filepath|image|image_path|path)"),
    (["--input", "{d}/good.csv", "--output", "{d}/o", "--caption-column", "title"], "--caption-column 'title'"),
    (["--input", "{d}/empty.csv", "--output", "{d}/o"], "is empty"),
    (["--input", "{d}/header.csv", "--output", "{d}/o"], "no inputs in"),
    (["--input", "{d}/allbad.csv", "--output", "{d}/o"], "none of the 1 inputs"),
    (["--input", "{d}/noclasses", "--output", "{d}/o"], "no class folders"),
    (["--input", "{d}/noimages", "--output", "{d}/o"], "no images"),
    (["--input", "{d}/good.csv", "--output", "{d}/o", "--shard-size", "0"], "--shard-size must be >= 1"),
    (["--input", "{d}/good.csv", "--output", "{d}/i.png/o"], "cannot create --output"),
    (["--input", "{d}/good.csv", "--output", "{d}/o", "--resize", "x"], "invalid int value"),
])
def test_make_shards_user_errors(tmp_path, capsys, args, fragment):
  _make_error_inputs(tmp_path)
  _user_error(capsys, make_shards.main, [a.format(d=tmp_path) for a in args], fragment)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_input_file(tmp_path, capsys):
  (tmp_path / "c.csv").write_text("image,caption\n")
  os.chmod(tmp_path / "c.csv", 0)
  _user_error(capsys, make_shards.main, ["--input", tmp_path / "c.csv", "--output", tmp_path / "o"],
              "cannot read --input")


def test_inspect_user_errors(tmp_path, capsys):
  fx.write_clean(str(tmp_path), 1, 1)
  _user_error(capsys, inspect_tool.main, [f"{tmp_path}/none-{{00000..00003}}.tar"], "no shard matches")
  _user_error(capsys, inspect_tool.main, [f"{tmp_path}/clean-00000.tar", "--samples", "-1"], "--samples")
  _user_error(capsys, inspect_tool.main, [f"{tmp_path}/clean-00000.tar", "--grid", f"{tmp_path}/clean-00000.tar/g.png"],
              "cannot write the grid")
