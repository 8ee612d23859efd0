"""A class-per-folder image tree (`root/class_name/…/image.jpg`) as a training source.

`list_image_folder(root)` gives the sorted class names (label = index) and every image file under them (hidden
files and other extensions ignored, symlinks followed). `ImageFolderFiles` is a grain random-access source of
the same raw elements the tar-shard stream produces — the encoded bytes, a caption made from the class name
with `caption_template` ('_' → ' '), the label — so decoding, augmentation and skip counting are shared
(`pipeline._DecodeSkip`). An unreadable file is skipped and counted as `unreadable_file`.
"""

from __future__ import annotations

import os

from vlm_jax.errors import UserError

FOLDER_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


def list_image_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
  """(sorted class names, [(path relative to root, class index)]) of `root/class_name/…/image`."""
  try:
    classes = sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
  except OSError as e:
    raise UserError(f"cannot read image folder {root} ({e.strerror})") from None
  files = []
  for index, name in enumerate(classes):
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      for fn in sorted(filenames):
        if not fn.startswith(".") and fn.lower().endswith(FOLDER_IMAGE_EXTS):
          files.append((os.path.relpath(os.path.join(dirpath, fn), root), index))
  return classes, files


class ImageFolderFiles:
  """Random-access raw elements {'image': bytes, 'ext', 'caption', 'label', 'skip', 'src'} of some files."""

  def __init__(self, root: str, files: list[tuple[str, int]], classes: list[str], caption_template: str = "{}"):
    self.root, self.files, self.classes, self.template = root, files, classes, caption_template

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict:
    rel, label = self.files[int(index)]
    path = os.path.join(self.root, rel)
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError:
      return {"image": b"", "ext": "", "caption": "", "label": -1, "skip": "unreadable_file", "src": path}
    caption = self.template.format(self.classes[label].replace("_", " "))
    return {"image": data, "ext": os.path.splitext(rel)[1][1:].lower(), "caption": caption, "label": label,
            "skip": "" if data else "empty_member", "src": path}
