"""ViLD (Gu et al. 2022): an open-vocabulary two-stage detector distilled from a frozen VLM teacher.

  python -m vlm_jax.distill --config=configs/distill/vild.py:tiny --workdir=DIR [--config.teacher.checkpoint=MODEL]
  --config=configs/distill/vild.py:tiny,method=vild_text      ViLD-text only (no image distillation)
  --config=configs/distill/vild.py:tiny,method=pseudo_boxes   ViLD + PB-OVD pseudo boxes from captions
  --config=configs/distill/vild.py:tiny,method=detpro         ViLD with DetPro's learned prompts as its classifier
  --config.data.coco=ANNOTATIONS.json:IMAGES_DIR              COCO-format data (OVR-CNN 48/17 split)

`tiny`: the embedded synthetic scenes (64 px, novel objects unlabelled in training), the `make demo` run as the
teacher, the student's backbone = the teacher's image tower (frozen and kept by reference, as F-VLM, Kuo et al.
2023; `--config.frozen=''` fine-tunes it as ViLD does), plus the closed-set baseline. `micro`: a seconds-long
version for tests. See vlm_jax/distill/__init__.py for every key.
"""

import ml_collections

from vlm_jax import config_lib as cb

METHODS = {  # name -> method settings (image_weight 0: no ViLD-image; pseudo_boxes: PB-OVD targets)
    "vild": {"image_weight": 0.5, "pseudo_boxes": False},
    "vild_text": {"image_weight": 0.0, "pseudo_boxes": False},
    "pseudo_boxes": {"image_weight": 0.5, "pseudo_boxes": True},
    "detpro": {"image_weight": 0.5, "pseudo_boxes": False},  # + method.detpro.enabled (below)
}


def get_config(arg=None):
  a = cb.parse_arg(arg, variant="tiny", method="vild", teacher="workdirs/demo")
  if a.method not in METHODS:
    raise cb.UserError(f"unknown distillation method {a.method!r}; use one of {sorted(METHODS)}")
  c = cb.base_config()
  c.name = a.method
  c.teacher = ml_collections.ConfigDict({"checkpoint": a.teacher, "templates": "synthetic", "batch_size": 256})
  c.method = ml_collections.ConfigDict({
      "name": a.method, "text_weight": 1.0, "temperature": 0.01, "ensemble_weight": 2 / 3, "top_k": 300,
      "max_detections": 100, "nms_iou": 0.5, **METHODS[a.method]})
  # DetPro (Du et al. 2022): learned context prompts trained on the cached crops replace the hand-crafted prompt
  # ensemble as the classifier (distill/detpro.py); bins: IoU edges of the graded contexts ((0.5, 1.0): one)
  c.method.detpro = ml_collections.ConfigDict({
      "enabled": a.method == "detpro", "n_ctx": 0, "init": "a photo of a", "init_std": 0.02,
      "bins": (0.5, 0.6, 0.7, 0.8, 0.9, 1.0), "steps": 1000, "lr": 1e-2, "batch_size": 256, "fg_fraction": 0.5,
      "temperature": 0.0, "seed": 0})
  # ViLD-image / PB-OVD: class-agnostic proposals whose 1x and 1.5x crops the teacher embeds once; 'rpn': the
  # closed-set baseline's base-trained RPN (ViLD's offline proposals), 'random': seeded boxes (distill/proposals.py)
  c.proposals = ml_collections.ConfigDict({"kind": "rpn", "per_image": 24, "nms_iou": 0.5, "min_size": 0.15,
                                           "max_size": 0.5, "scales": (1.0, 1.5)})
  c.pseudo_boxes = ml_collections.ConfigDict({"scorer": "dense", "dense_size": 128, "temperature": 0.05,
                                              "max_boxes": 4})
  c.teacher_cache = ml_collections.ConfigDict({"dir": "", "chunk": 256})
  c.baselines = ("closed_set",)  # run beside the method, same data and schedule; reported under their names
  c.data = ml_collections.ConfigDict({
      "image_size": 64, "num_train": 1024, "num_eval": 128, "seed": 0, "objects": (2, 4), "p_novel": 0.35,
      "eval_split": "val", "coco": "", "coco_eval": "", "coco_split": "ovr_cnn"})
  # the detector (vlm_jax.models.detection.detector.build); image 'teacher': the teacher's image tower config
  c.model = ml_collections.ConfigDict({
      "framework": "detector", "image": "teacher", "pyramid_channels": 64, "fc_dim": 256, "roi_size": 7,
      "canonical_size": 32.0, "canonical_level": 3, "anchor_sizes": (8, 16, 32, 64, 128),
      "pre_nms_train": 256, "post_nms_train": 64, "pre_nms_test": 256, "post_nms_test": 64,
      "rpn_batch_per_image": 64, "roi_batch_per_image": 64})
  # the student's backbone from the teacher's image tower ('teacher' = config.teacher.checkpoint)
  c.init.sources = ({"checkpoint": "teacher", "params": r"^detector/backbone/",
                     "rename": {r"^detector/backbone/": "img/"}, "required": True},)
  c.frozen = r"^detector/backbone/"
  c.checkpoint_frozen = False       # the frozen backbone is the teacher's: kept by reference, not copied
  c.batch_size = 16
  c.total_steps = 400
  c.log_every_steps = 20
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 200
  c.optimizer = cb.optimizer_config(lr=2e-3, b2=0.999, eps=1e-8, weight_decay=1e-4, warmup_steps=50)
  c.objectives = ml_collections.ConfigDict()
  c.evals = ml_collections.ConfigDict({"detection": {"kind": "detection", "num_images": 128,
                                                   "batch_size": 16}})
  if a.variant == "micro":
    c.data.num_train, c.data.num_eval = 64, 32
    c.total_steps, c.batch_size, c.log_every_steps, c.checkpoint_every_steps = 40, 8, 5, 10
    c.optimizer.warmup_steps = 5
    c.proposals.per_image = 8
    c.method.detpro.steps = 200
    c.proposals.kind = "random"  # no baseline needed first (tests); 'rpn' is tested on its own
    c.evals.detection.num_images, c.evals.detection.batch_size = 32, 8
    c.teacher_cache.chunk = 32
  elif a.variant != "tiny":
    raise cb.UserError(f"unknown variant {a.variant!r} of configs/distill/vild.py; use tiny or micro")
  return c
