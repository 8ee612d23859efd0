"""Distillation: open-vocabulary students trained from a frozen vision-language teacher.

  python -m vlm_jax.distill --config=configs/distill/vild.py:tiny --workdir=DIR [--config.teacher.checkpoint=MODEL]

Part 1, open-vocabulary detection (configs/distill/vild.py):
  ViLD-text   (Gu et al. 2022) region embeddings vs the frozen normalised text embeddings of the base classes and a
              learned background embedding, logits / τ, cross-entropy                       `method=vild_text`
  ViLD-image  L1 between normalised region embeddings of cached proposals and the teacher's embeddings of their
              1× and 1.5× crops; ViLD-ensemble at inference (weighted geometric mean)      `method=vild` (default)
  PB-OVD      (Gao et al. 2022) pseudo boxes of the caption's novel objects from the teacher's MaskCLIP dense maps,
              as extra ground truth                                                          `method=pseudo_boxes`
  DetPro      (Du et al. 2022) context prompts learned on the cached crops (background interpretation,
              IoU-graded contexts) replace the hand-crafted prompt ensemble as ViLD's classifier  `method=detpro`
  closed set  the baseline: a learned linear classifier over the base classes (novel AP 0 by construction),
              trained beside every method (`config.baselines`) and reported as `closed_set/detection/…`

Part 2, open-vocabulary segmentation (configs/distill/maskclip_plus.py, lseg.py; `task='segmentation'`, run by
`segmentation.distill`):
  MaskCLIP+   (Zhou et al. 2022) the teacher's refined MaskCLIP predictions (key smoothing, prompt denoising) as
              pixel pseudo-labels of a student segmenter with the text embeddings as classifier; annotation-free;
              optional self-training rounds                                                 `maskclip_plus`
  LSeg        (Li et al. 2022) per-pixel embeddings, softmax over the base classes' text embeddings / τ  `lseg`
  closed set  a linear head over background + base classes (novel mIoU 0 by construction)
  multi-teacher  MaskCLIP+ from several frozen teachers (configs/distill/multi_teacher.py, multi_teacher.py): a
              projection head per teacher, Σ_k w_k(x) CE(ℓ_k, ŷ_k), fixed or per-pixel confidence weights  `multi_teacher`
Modules: segmentation.py (the run), pseudo_labels.py (MaskCLIP pseudo-labels, cached), seg_data.py (scenes as images
+ label maps), seg_loss.py (pixel cross-entropy), seg_evaluation.py (base / novel / harmonic mIoU of student,
teacher and broadcast baseline, overlays); the student: `vlm_jax.models.segmentation.segmenter`.

Modules (each with its paper and equations):
  run.py            distill(config, workdir): teacher → cached teacher outputs → student → the one loop → metrics
  teacher.py        the frozen teacher (any vlm_jax run or converted CLIP/SigLIP): text, crop and dense embeddings
  teacher_cache.py  proposals' crop embeddings cached on disk by teacher fingerprint + settings, resumable
  vild.py           ViLD-text / ViLD-image losses, the ensemble, the loss function of a student
  pseudo_boxes.py   PB-OVD pseudo boxes from captions and dense teacher maps
  detpro.py         DetPro prompts learned from the cached crops (a preprocessing stage), cached by fingerprint
  student.py        the student's `model.open_vocab` settings from `method` (the model itself, OpenVocabDetector:
                    `models.detection.open_vocab`, the detector + the ViLD or closed-set classifier, `detect`)
  evaluation.py     COCO AP / AP50 / base and novel AP50 / APr (pycocotools), plots/detections.png, COCO JSON
  data.py           synthetic scenes or COCO JSON + images (OVR-CNN 48/17 split), the grain training iterator

Config keys (configs/distill/vild.py): teacher {checkpoint, templates, batch_size}; method {name, text_weight,
image_weight (0: no ViLD-image), temperature τ, ensemble_weight λ, pseudo_boxes, top_k, max_detections,
nms_iou, detpro {enabled, n_ctx (0: the init phrase's length), init ('a photo of a'; '' random), init_std,
bins (IoU edges of the graded contexts), steps, lr, batch_size, fg_fraction, temperature (0: the teacher's), seed}};
proposals {kind, per_image, min_size, max_size, scales}; pseudo_boxes {scorer 'dense'|'crops',
dense_size, temperature, max_boxes}; teacher_cache {dir ('' = $VLM_JAX_CACHE/distill_teacher), chunk};
baselines; data {image_size, num_train, num_eval, seed, objects, p_novel, eval_split, coco, coco_eval,
coco_split}; model (the detector: `vlm_jax.models.detection.detector.build`; image 'teacher' = the teacher's
image tower; the run records embed_dim and open_vocab, the classifier from `method`, so the saved config rebuilds
the whole student and `python -m vlm_jax.evaluate --config=configs/eval/detection.py --workdir=DIR` evaluates
it); init.sources ('teacher' = config.teacher.checkpoint); frozen / checkpoint_frozen (the frozen backbone
is kept by reference: `vlm_jax.runs.reference`); the usual run keys (batch_size, total_steps, optimizer, …).
"""
