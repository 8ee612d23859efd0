"""Embedding helpers shared by evaluation, inference, transfer and distillation (no training, no evaluators).

  batched.py     `Embedder` / `apply_batched`: a model method over host arrays in fixed-size, mesh-sharded batches
  prompts.py     prompt templates (package data under templates/) and CuPL-style descriptions
  class_names.py class-name files (package data under classnames/: CoOp's 11-dataset suite) and label mapping
  classifier.py  zero-shot class embeddings: the CLIP prompt ensemble
  context_prompts.py  prompts with learned context slots (CoOp): tokenised placeholders, the splice of context
                 vectors into the text tower's token embeddings (transfer's CoOp family and distill's DetPro)
"""
