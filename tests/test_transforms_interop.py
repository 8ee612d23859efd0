"""The eval transform is pixel-exact with CLIP's/open_clip's (torchvision Resize + CenterCrop on PIL images)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data import transforms


@pytest.mark.interop
def test_resize_center_crop_equals_torchvision():
  T = pytest.importorskip("torchvision.transforms")
  rng = np.random.default_rng(0)
  for _ in range(30):
    w, h = (int(v) for v in rng.integers(40, 400, 2))
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    for size in (32, 224):
      ref = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])(img)
      np.testing.assert_array_equal(transforms.resize_center_crop(img, size), np.asarray(ref), err_msg=f"{w}x{h}")
