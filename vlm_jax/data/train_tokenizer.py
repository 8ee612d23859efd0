"""Trains a SentencePiece tokenizer on captions for the 'sentencepiece' tokenizer.

  python -m vlm_jax.data.train_tokenizer --input captions.txt --vocab_size 32000 --output DIR/spm
  python -m vlm_jax.data.train_tokenizer --shards 'data/train-{00000..00099}.tar' --limit 2000000 \\
      --vocab_size 32000 --output DIR/spm

Reads one caption per line of `--input`, or the captions of the tar shards `--shards` (any spec that
`vlm_jax.data.shards.iter_captions` takes), and writes PREFIX.model and PREFIX.vocab with the `sentencepiece`
library (Kudo & Richardson, 2018; the unigram language model of Kudo, 2018 by default, or BPE). Only the
unknown piece is reserved (id 0): the tokenizer adds pad, SOT and EOT around the pieces itself. Use the result
with `--config.tokenizer.name=sentencepiece --config.tokenizer.model_path=PREFIX.model`.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Iterator

from vlm_jax.errors import UserError, exit_on_user_error


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line `error: …`, exit 2, via exit_on_user_error
    raise UserError(message)


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m vlm_jax.data.train_tokenizer", description=__doc__.split("\n\n")[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--input", help="text file, one caption per line")
  src.add_argument("--shards", help="tar shard spec (PATTERN[:weight],…; globs, {00000..00099} ranges, URLs)")
  p.add_argument("--vocab_size", type=int, required=True, help="number of pieces, the unknown piece included")
  p.add_argument("--output", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
  p.add_argument("--model_type", choices=("unigram", "bpe"), default="unigram")
  p.add_argument("--limit", type=int, default=None, help="read at most this many captions")
  p.add_argument("--character_coverage", type=float, default=0.9995,
                 help="fraction of characters the pieces cover (rarer ones become unknown)")
  return p


def _captions(args) -> Iterator[str]:
  if args.input:
    if not os.path.isfile(args.input):
      raise UserError(f"--input {args.input}: no such file")
    n = 0
    with open(args.input, encoding="utf-8", errors="replace") as f:
      for line in f:
        if args.limit is not None and n >= args.limit:
          return
        line = line.strip()
        if line:
          n += 1
          yield line
  else:
    from vlm_jax.data.shards import iter_captions  # noqa: PLC0415
    for caption in iter_captions(args.shards, args.limit):
      caption = " ".join(caption.split())
      if caption:
        yield caption


def train(args) -> dict:
  """Trains and writes the model; returns {'model': path, 'pieces': int, 'captions': int}."""
  try:
    import sentencepiece as spm  # noqa: PLC0415
  except ImportError:
    raise UserError("training a tokenizer needs the package sentencepiece: pip install sentencepiece") from None
  if args.vocab_size < 2:
    raise UserError(f"--vocab_size must be >= 2, got {args.vocab_size}")
  out_dir = os.path.dirname(os.path.abspath(args.output))
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise UserError(f"--output {args.output}: cannot create {out_dir} ({e.strerror})") from None
  captions = list(_captions(args))
  if not captions:
    raise UserError(f"no captions in {args.input or args.shards}")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=model, vocab_size=args.vocab_size,
        model_type=args.model_type, character_coverage=args.character_coverage, unk_id=0, bos_id=-1,
        eos_id=-1, pad_id=-1, num_threads=max(1, min(16, os.cpu_count() or 1)), minloglevel=2)
  except RuntimeError as e:  # e.g. "Vocabulary size too high (…). Please set it to a value <= …"
    message = " ".join(str(e).split())
    raise UserError(f"sentencepiece training failed: {message.split('] ')[-1]}") from None
  processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
  path = args.output + ".model"
  try:
    with open(path, "wb") as f:
      f.write(model.getvalue())
    with open(args.output + ".vocab", "w", encoding="utf-8") as f:
      for i in range(processor.get_piece_size()):
        f.write(f"{processor.id_to_piece(i)}\t{processor.get_score(i)}\n")
  except OSError as e:
    raise UserError(f"--output {args.output}: cannot write ({e.strerror})") from None
  return {"model": path, "pieces": processor.get_piece_size(), "captions": len(captions)}


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
  args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
  result = train(args)
  print(f"wrote {result['model']}: {result['pieces']} pieces from {result['captions']} captions; use "
        f"--config.tokenizer.name=sentencepiece --config.tokenizer.model_path={result['model']} "
        f"(vocab_size {result['pieces'] + 3})", flush=True)
  return result


if __name__ == "__main__":
  main()
