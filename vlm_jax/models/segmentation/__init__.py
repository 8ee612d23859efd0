"""Dense open-vocabulary segmenters: an image tower + a feature-pyramid head whose per-pixel embeddings are scored
against text embeddings (MaskCLIP+, LSeg) or a closed-set linear classifier (the baseline). See `segmenter.py`."""
