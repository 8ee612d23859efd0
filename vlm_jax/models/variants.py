"""Model sizes from short strings ("B/16", "L", "RN50"): the one place variant names are decoded.

ViT sizes follow Table 2 of Zhai et al. 2022 ("Scaling Vision Transformers", arXiv:2106.04560) as tabulated
in big_vision's `models/vit.py` (`mu` is big_vision's 1-layer micro model; So400m is the shape-optimised ViT
of Alabdulmohsin et al. 2023). Text sizes follow the open_clip `text_cfg` of the matching CLIP model
(Radford et al. 2021; Cherti et al. 2023); `So400m` is the SigLIP text tower (Zhai et al. 2023). ResNet sizes
are the CLIP ModifiedResNet configs of open_clip (RN50, RN101, RN50x4). `tiny` everywhere is a CPU-sized model
for tests and the demo.
"""

from __future__ import annotations

from vlm_jax.errors import UserError

# name: (width, depth, mlp_dim, num_heads)
VIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (64, 2, 256, 2),
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
}

# name: (width, depth, mlp_dim, num_heads)
TEXT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (64, 2, 256, 2),
    "S": (384, 12, 1536, 6),      # open_clip ViT-S-16 text
    "M": (512, 12, 2048, 8),      # open_clip ViT-M-16 text
    "B": (512, 12, 2048, 8),      # ViT-B-32 / ViT-B-16 / RN50 text
    "L": (768, 12, 3072, 12),     # ViT-L-14 text
    "H": (1024, 24, 4096, 16),    # ViT-H-14 text
    "g": (1024, 24, 4096, 16),    # ViT-g-14 text
    "G": (1280, 32, 5120, 20),    # ViT-bigG-14 text
    "So400m": (1152, 27, 4304, 16),  # SigLIP So400m text (bidirectional, 'last' pooling in big_vision)
}

# name: (layers per stage, stem width, output_dim (= open_clip embed_dim), image_size)
RESNET_SIZES: dict[str, tuple[tuple[int, int, int, int], int, int, int]] = {
    "tiny": ((1, 1, 1, 1), 16, 64, 64),
    "RN50": ((3, 4, 6, 3), 64, 1024, 224),
    "RN101": ((3, 4, 23, 3), 64, 512, 224),
    "RN50x4": ((4, 6, 10, 6), 80, 640, 288),
}

DEFAULT_PATCH = 16


def _unknown(kind: str, name, choices) -> UserError:
  return UserError(f"unknown {kind} variant {name!r}; valid choices: {', '.join(choices)}")


def vit_variant(name: str) -> dict:
  """Decodes "B/16" (or "B", patch 16) to ViT fields.

  Returns dict(width, depth, mlp_dim, num_heads, patch_size). Unknown names raise `UserError`.
  """
  if not isinstance(name, str) or not name:
    raise _unknown("ViT", name, list(VIT_SIZES))
  size, _, patch = name.partition("/")
  if size not in VIT_SIZES:
    raise _unknown("ViT", name, [f"{k}[/patch]" for k in VIT_SIZES])
  if patch:
    if not patch.isdigit() or int(patch) <= 0:
      raise UserError(f"bad patch size in ViT variant {name!r}; write e.g. 'B/16'")
    patch_size = int(patch)
  else:
    patch_size = DEFAULT_PATCH
  width, depth, mlp_dim, num_heads = VIT_SIZES[size]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads, patch_size=patch_size)


def text_variant(name: str) -> dict:
  """Decodes a text tower size ("B", "L", …) to dict(width, depth, mlp_dim, num_heads)."""
  if name not in TEXT_SIZES:
    raise _unknown("text", name, list(TEXT_SIZES))
  width, depth, mlp_dim, num_heads = TEXT_SIZES[name]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)


def resnet_variant(name: str) -> dict:
  """Decodes a CLIP ModifiedResNet name (Radford et al. 2021) to its open_clip config.

  Returns dict(layers, width, heads, output_dim, image_size): `width` is the stem width (the last stage has
  width * 32 channels), `heads` the attention-pool heads (width * 32 // 64, as open_clip), `output_dim` the
  attention-pool output (open_clip's embed_dim), `image_size` the resolution the attention-pool positional
  embedding is made for.
  """
  if name not in RESNET_SIZES:
    raise _unknown("ResNet", name, list(RESNET_SIZES))
  layers, width, output_dim, image_size = RESNET_SIZES[name]
  return dict(layers=layers, width=width, heads=width * 32 // 64, output_dim=output_dim,
              image_size=image_size)
