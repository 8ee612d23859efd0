"""Two-stage open-vocabulary detector parts (Faster R-CNN with FPN / ViTDet pyramids): boxes, anchors, NMS,
matching, pyramids, RPN, box head, the `TwoStageDetector` that wires them (`detector.build(cfg)`), and
`open_vocab.OpenVocabDetector`, its region classifier against text embeddings (ViLD) or a closed-set one, with
`detect` (final detections); `detector.build` wraps it in when the model config has `open_vocab`."""
