"""Two-stage open-vocabulary detector parts (Faster R-CNN with FPN / ViTDet pyramids): boxes, anchors, NMS,
matching, pyramids, RPN, box head and the `TwoStageDetector` that wires them (`detector.build(cfg)`)."""
