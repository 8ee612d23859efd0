"""Weight conversion entry point (`python -m vlm_jax.convert`, console script `vlm-convert`).

Import (writes a vlm_jax checkpoint directory, see `vlm_jax.interop`):

  python -m vlm_jax.convert --source open_clip --arch ViT-B-32 --input vit_b32.pt --output converted/vit_b32
  python -m vlm_jax.convert --source openai --arch RN50 --input RN50.pt --output converted/rn50
  python -m vlm_jax.convert --source hf --input clip-vit-base-patch32/ --output converted/hf_b32

`--arch` is an open_clip model name (ViT-B-32, ViT-B-16, ViT-L-14, RN50, ViT-B-16-SigLIP, …) or the path of an
open_clip model-config JSON (default: inferred from the tensor shapes); `--image_size N` converts for another
input resolution: the image tower's position embeddings are resized once (open_clip's bicubic recipe for
open_clip / openai files; otherwise `interop.with_image_size`, the towers' own call-time resize).
`--tokenizer_file spiece.model` records the SentencePiece model of a SigLIP file that does not carry it.

Export (from any vlm_jax checkpoint directory: converted, or a pre-training workdir):

  python -m vlm_jax.convert --to open_clip --input workdirs/run --output run.safetensors   (or .pt / .bin)
  python -m vlm_jax.convert --to hf --input workdirs/run --output hf_run/

User mistakes print one line `error: …` and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

from vlm_jax.errors import UserError, exit_on_user_error

_IMPORT_FORMATS = ("open_clip", "openai", "hf")
_EXPORT_FORMATS = ("open_clip", "hf")


class _Parser(argparse.ArgumentParser):
  """argparse whose mistakes are `UserError`s (one line, exit 2) instead of a usage dump."""

  def error(self, message):
    raise UserError(message + " (see python -m vlm_jax.convert --help)")


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m vlm_jax.convert", description=__doc__.split("\n\n")[0],
              formatter_class=argparse.RawDescriptionHelpFormatter,
              epilog="\n\n".join(__doc__.split("\n\n")[1:]))
  p.add_argument("--source", choices=_IMPORT_FORMATS, help="import: format of --input")
  p.add_argument("--to", choices=_EXPORT_FORMATS, help="export: format to write")
  p.add_argument("--arch", help="open_clip / openai: model name (ViT-B-32, RN50, …) or model-config JSON path")
  p.add_argument("--input", help="checkpoint file / HF directory (import) or vlm_jax checkpoint dir (export)")
  p.add_argument("--output", help="vlm_jax checkpoint directory (import) or file / HF directory (export)")
  p.add_argument("--image_size", type=int, help="import: input resolution to convert for (default: the source's)")
  p.add_argument("--tokenizer_file", help="import: the tokenizer's model file when the weights do not carry it "
                 "(SigLIP from open_clip: the SentencePiece spiece.model)")
  return p


def parse(argv: list[str]) -> argparse.Namespace:
  args = _parser().parse_args(argv)
  if bool(args.source) == bool(args.to):
    raise UserError("give --source FORMAT (import into vlm_jax) or --to FORMAT (export from vlm_jax), not both")
  for flag in ("input", "output"):
    if not getattr(args, flag):
      raise UserError(f"--{flag} is required")
  if args.to and (args.arch or args.image_size or args.tokenizer_file):
    raise UserError("--arch, --image_size and --tokenizer_file only apply to an import (--source)")
  if args.tokenizer_file and not os.path.isfile(args.tokenizer_file):
    raise UserError(f"tokenizer file {args.tokenizer_file} does not exist")
  if args.image_size is not None and args.image_size < 1:
    raise UserError(f"--image_size must be a positive integer, got {args.image_size}")
  if not os.path.exists(args.input):
    raise UserError(f"input {args.input} does not exist")
  return args


def _count(variables: dict) -> int:
  import jax  # noqa: PLC0415
  return sum(math.prod(x.shape) for x in jax.tree.leaves(variables.get("params", {})))


def _tower(cfg: dict) -> str:
  skip = ("kind", "variant", "dtype", "param_dtype", "scan", "remat")
  extra = ", ".join(f"{k}={v}" for k, v in sorted(cfg.items()) if k not in skip)
  return f"{cfg.get('kind')} {cfg.get('variant') or ''}".rstrip() + (f" ({extra})" if extra else "")


def summary(config, variables: dict, out: str) -> list[str]:
  """Human lines describing a converted model and the commands to use it next."""
  m, d = config.model.to_dict(), config.data
  kind = "SigLIP" if m.get("logit_bias_init") is not None else "CLIP"
  lines = [
      " ".join(str(p) for p in ("converted", config.source.get("format", "?"), config.source.get("arch"), "->", out)
               if p),
      f"  model      {kind} two-tower, embed_dim {m.get('embed_dim')}, {_count(variables) / 1e6:.1f}M parameters",
      f"  image      {_tower(m['image'])}",
      f"  text       {_tower(m['text'])}",
      f"  tokenizer  {', '.join(f'{k}={v}' for k, v in config.tokenizer.to_dict().items())}",
      f"  transform  resize shorter side to {d.image_size} (bicubic) + center crop, mean {tuple(d.mean)}, "
      f"std {tuple(d.std)}",
      "next:",
      f"  python -c \"import vlm_jax.inference as I; from PIL import Image; m = I.load('{out}'); "
      "print(m.classify([Image.open('cat.jpg')], ['cat', 'dog']))\"",
      f"  python -m vlm_jax.evaluate --config=configs/eval/synthetic.py --checkpoint={out}",
      f"  LiT / fine-tuning: --config.init.checkpoint={out} with a config whose model.image is {m['image']}",
      f"  python -m vlm_jax.convert --to open_clip --input {out} --output model.safetensors",
  ]
  if "model_path" in config.tokenizer and not config.tokenizer.model_path:
    lines.insert(6, f"  note: the {config.tokenizer.name} tokenizer has no model file: text needs "
                 f"--tokenizer_file at conversion, or vlm_jax.inference.load(DIR, tokenizer={{'model_path': …}})")
  return lines


def run_import(args) -> dict:
  from vlm_jax import interop  # noqa: PLC0415
  out = os.path.abspath(args.output)
  if os.path.isdir(out) and os.listdir(out):  # fail before the (slow) conversion
    raise UserError(f"output directory {out} is not empty; choose a new directory")
  config, variables = interop.convert(args.source, args.input, arch=args.arch, image_size=args.image_size)
  if args.tokenizer_file:
    if "model_path" not in config.tokenizer:
      raise UserError(f"the {config.tokenizer.get('name')} tokenizer of this model takes no --tokenizer_file")
    config.tokenizer.model_path = os.path.abspath(args.tokenizer_file)
  given = config.get("source")
  config.source = {"format": args.source, "file": os.path.abspath(args.input),
                   **({"arch": args.arch} if args.arch else {}),
                   **(given.to_dict() if hasattr(given, "to_dict") else dict(given or {})),
                   **({"image_size": args.image_size} if args.image_size else {})}
  interop.save_converted(out, config, variables)
  config, variables = interop.load_converted(out)
  for line in summary(config, variables, out):
    print(line, flush=True)
  return {"output": out, "parameters": _count(variables)}


def run_export(args) -> dict:
  from vlm_jax import interop  # noqa: PLC0415
  config, variables = interop.load_converted(args.input)
  path = interop.export(args.to, config, variables, args.output)
  print(f"exported {os.path.abspath(args.input)} -> {path} ({args.to}, {_count(variables) / 1e6:.1f}M "
        "parameters)", flush=True)
  if args.to == "open_clip":
    arch = config.get("source", {}).get("arch") or "ARCH"
    print(f"next (PyTorch): model = open_clip.create_model('{arch}'); "
          f"model.load_state_dict({_loader(path)})", flush=True)
  else:
    print(f"next (PyTorch): transformers.AutoModel.from_pretrained('{path}')", flush=True)
  return {"output": path, "parameters": _count(variables)}


def _loader(path: str) -> str:
  if path.endswith(".safetensors"):
    return f"safetensors.torch.load_file('{path}')"
  return f"torch.load('{path}', weights_only=True)"


@exit_on_user_error
def convert(argv: list[str] | None = None) -> dict:
  """Runs one import or export; returns {'output', 'parameters'}."""
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  args = parse(list(sys.argv[1:] if argv is None else argv))
  return run_import(args) if args.source else run_export(args)


def main(argv: list[str] | None = None) -> None:
  """Console-script entry (`vlm-convert`): returns None so the exit status is 0 on success."""
  convert(argv)


if __name__ == "__main__":
  main()
