"""Builders of damaged and hostile data for the fault suite: shards with every defect kind at a set rate, tar
members that are links or devices, decompression-bomb images and lying headers.

Nothing here needs torch: hostile pickles and safetensors files are written with the standard library.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import tarfile
import zipfile
import zlib

from tests import shard_fixtures as fx

# ---- images ---------------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
  """A PNG whose header declares width × height RGB pixels but whose data is a few bytes (a lying header)."""
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(bytes(64)))
          + _png_chunk(b"IEND", b""))


def png_bomb(width: int, height: int) -> bytes:
  """A valid 8-bit grayscale PNG of width × height zeros: megabytes of pixels in a file of ~width·height/1000
  bytes (a real decompression bomb; Pillow decodes it fully unless refused). Built fast: one chunk of rows is
  deflated once, ending on a full flush (byte-aligned, no references back), and that block is repeated."""
  row = bytes(width + 1)  # filter byte 0 + the row
  per_chunk = max(1, min(height, (1 << 22) // len(row)))
  n_chunks, rest = divmod(height, per_chunk)
  comp = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate
  block = comp.compress(row * per_chunk) + comp.flush(zlib.Z_FULL_FLUSH)
  comp = zlib.compressobj(9, zlib.DEFLATED, -15)
  last = comp.compress(row * rest) + comp.flush()  # the final block
  adler = 1
  for _ in range(n_chunks):
    adler = zlib.adler32(row * per_chunk, adler)
  adler = zlib.adler32(row * rest, adler)
  idat = b"\x78\xda" + block * n_chunks + last + struct.pack(">I", adler)
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
          + _png_chunk(b"IEND", b""))


def jpeg_declaring(width: int, height: int) -> bytes:
  """A small real JPEG whose frame header (SOF0) is patched to declare width × height (≤ 65535 each)."""
  data = bytearray(fx.image_bytes(3, "JPEG"))
  sof = data.find(b"\xff\xc0")
  struct.pack_into(">HH", data, sof + 5, height, width)
  return bytes(data)


# ---- tar members ----------------------------------------------------------------------------------------------


def add_file(t: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  t.addfile(info, io.BytesIO(data))


def add_special(t: tarfile.TarFile, name: str, kind: str, target: str = "/etc/passwd") -> None:
  """A member of type `kind`: 'symlink', 'hardlink', 'chardev', 'blockdev', 'fifo' or 'dir'."""
  info = tarfile.TarInfo(name)
  info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "chardev": tarfile.CHRTYPE,
               "blockdev": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE, "dir": tarfile.DIRTYPE}[kind]
  if kind in ("symlink", "hardlink"):
    info.linkname = target
  if kind in ("chardev", "blockdev"):
    info.devmajor, info.devminor = 1, 3  # /dev/null's numbers
  t.addfile(info)


# ---- a shard set with every defect kind at 5 % ------------------------------------------------------------------

# the per-sample defect kinds (one sample each); `corrupt_image` and `decompression_bomb` are found by the decoder
_PNG = fx.image_bytes(7)
PER_SAMPLE_DEFECTS = {
    "corrupt_image": lambda t, k: (add_file(t, f"{k}.jpg", b"not an image"), add_file(t, f"{k}.txt", b"corrupt")),
    "empty_member": lambda t, k: (add_file(t, f"{k}.png", b""), add_file(t, f"{k}.txt", b"zero-byte image")),
    "missing_image": lambda t, k: add_file(t, f"{k}.txt", b"a caption without its image"),
    "missing_caption": lambda t, k: add_file(t, f"{k}.png", _PNG),
    "empty_caption": lambda t, k: (add_file(t, f"{k}.png", _PNG), add_file(t, f"{k}.txt", b" \n\t ")),
    "bad_text": lambda t, k: (add_file(t, f"{k}.png", _PNG), add_file(t, f"{k}.txt", b"\xff\xfe caption")),
    "bad_label": lambda t, k: (add_file(t, f"{k}.png", _PNG), add_file(t, f"{k}.txt", b"bad label"),
                               add_file(t, f"{k}.cls", b"dog")),
    "special_member": lambda t, k: (add_special(t, f"{k}.png", "symlink"), add_file(t, f"{k}.txt", b"a link")),
    "decompression_bomb": lambda t, k: (add_file(t, f"{k}.png", png_declaring(30000, 30000)),
                                        add_file(t, f"{k}.txt", b"a bomb")),
}
DECODER_DEFECTS = ("corrupt_image", "decompression_bomb")


def write_defect_set(out_dir: str, *, shards_with_samples: int = 8, per_kind: int = 2, good: int = 22,
                     truncated: tuple[int, ...] = (2, 3), unreadable: tuple[int, ...] = (0, 1)) -> dict:
  """`data-00000.tar` … : `shards_with_samples` shards of `good + per_kind × 9` sample slots (22 + 18 = 40: each
  defect kind is 5 % of the slots), good and bad alternating, the first and last slot good; the shards at the
  positions `truncated` are cut in the middle of one extra sample after their slots (the truncated tail), and
  the files at the positions `unreadable` are not tars (random bytes, an empty file).

  Returns {'paths', 'good' (captions of the valid samples, 'shard S sample I'), 'per_shard' ({path: {reason:
  n}} skip counts of one full read), 'pattern'}."""
  os.makedirs(out_dir, exist_ok=True)
  n_files = shards_with_samples + len(unreadable)
  paths = [os.path.join(out_dir, f"data-{i:05d}.tar") for i in range(n_files)]
  good_captions, per_shard = [], {}
  for j, path in enumerate(paths):
    if j in unreadable:
      with open(path, "wb") as f:
        f.write(os.urandom(5000) if unreadable.index(j) % 2 == 0 else b"")
      per_shard[path] = {"unreadable_shard": 1}
      continue
    kinds = [k for k in PER_SAMPLE_DEFECTS for _ in range(per_kind)]
    counts = {k: per_kind for k in PER_SAMPLE_DEFECTS}
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
      g = 0
      for slot in range(good + len(kinds)):
        key = f"s{j:02d}_{slot:03d}"
        bad_turn = slot % 2 == 1 and (slot - 1) // 2 < len(kinds)
        if bad_turn:
          PER_SAMPLE_DEFECTS[kinds[(slot - 1) // 2]](t, key)
        else:
          caption = f"shard {j} sample {g}"
          add_file(t, f"{key}.png", fx.image_bytes(1000 * j + g))
          add_file(t, f"{key}.txt", caption.encode())
          add_file(t, f"{key}.cls", str(1000 * j + g).encode())
          good_captions.append(caption)
          g += 1
      assert g == good
      if j in truncated:
        add_file(t, f"s{j:02d}_tail.png", fx.image_bytes(99))
        add_file(t, f"s{j:02d}_tail.txt", b"lost in the cut")
    if j in truncated:
      with tarfile.open(path) as t:
        cut = [m for m in t.getmembers() if m.name == f"s{j:02d}_tail.png"][0].offset_data + 100
      with open(path, "rb") as f:
        data = f.read()
      with open(path, "wb") as f:
        f.write(data[:cut])
      counts["truncated_shard"] = 1
    per_shard[path] = counts
  return {"paths": paths, "good": good_captions, "per_shard": per_shard,
          "pattern": os.path.join(out_dir, "data-*.tar")}


# ---- hostile weight files ---------------------------------------------------------------------------------------


class Payload:
  """Unpickling this runs `touch MARKER` (the classic `__reduce__` attack)."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def evil_pickle(marker: str) -> bytes:
  return pickle.dumps({"visual.conv1.weight": Payload(marker)}, protocol=2)


def write_evil_torch_files(out_dir: str, marker: str) -> dict[str, str]:
  """{layout: path} of weight files whose pickle runs `touch marker` when unpickled: a legacy `torch.save`
  pickle (.pt, .bin), the zip layout of `torch.save` (archive/data.pkl, version, byteorder) and a TorchScript-like
  archive (archive/data.pkl, constants.pkl, code/)."""
  raw = evil_pickle(marker)
  out = {}
  for name in ("legacy.pt", "legacy.bin"):
    out[name] = os.path.join(out_dir, name)
    with open(out[name], "wb") as f:
      f.write(raw)
  out["zip.pt"] = os.path.join(out_dir, "zip.pt")
  with zipfile.ZipFile(out["zip.pt"], "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", raw)
    z.writestr("archive/byteorder", "little")
    z.writestr("archive/version", "3\n")
  out["torchscript.pt"] = os.path.join(out_dir, "torchscript.pt")
  with zipfile.ZipFile(out["torchscript.pt"], "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", raw)
    z.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
    z.writestr("archive/code/__torch__/model.py", "")
    z.writestr("archive/version", "3\n")
  return out


def _safetensors(header: dict, data: bytes) -> bytes:
  h = json.dumps(header).encode()
  return struct.pack("<Q", len(h)) + h + data


LYING_SAFETENSORS = {
    # data_offsets beyond the end of the file (declares a 4 MB tensor in 16 bytes)
    "offsets_past_end": _safetensors({"visual.proj": {"dtype": "F32", "shape": [1000, 1000],
                                                      "data_offsets": [0, 4_000_000]}}, bytes(16)),
    # header length field of 1 TiB
    "header_length": struct.pack("<Q", 1 << 40) + b"{}",
    # the shape needs 16 bytes, the offsets give 8
    "shape_vs_offsets": _safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, bytes(8)),
    # two tensors overlapping
    "overlap": _safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                             "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)),
    # the header is not JSON
    "not_json": struct.pack("<Q", 5) + b"{abc}",
    # cut: the file ends inside the header
    "cut_header": struct.pack("<Q", 200) + b'{"w": {"dtype": "F32", ',
}
