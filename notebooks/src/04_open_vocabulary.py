# %% [markdown]
# # 04 · Open-vocabulary segmentation: MaskCLIP teacher vs a distilled student
#
# A frozen CLIP teacher segments without any training: MaskCLIP (Zhou et al. 2022) reads dense features from the
# value path of the image tower's last block and labels each location with its nearest class text embedding.
# MaskCLIP+ (ibid., §3.3) distils those maps into a student segmenter — the teacher's image tower (frozen) + FPN +
# a head whose classifier is the teacher's text embeddings of the class names:
# min_θ Σ_x CE(ℓ_θ(x), ŷ_MaskCLIP(x)). No mask annotation is read in training, and the student keeps the open
# vocabulary: it can name classes it never saw labelled.
#
# The data are synthetic scenes of 2–4 objects; 16 of the 48 classes are *novel* (never labelled in training;
# marked `*`). The run is `python -m vlm_jax.distill --config=configs/distill/maskclip_plus.py:<variant>` —
# `vlm_jax.distill.run.distill(config, workdir)` is the same call. The teacher is `TEACHER_DIR`, else the
# `make demo` run, else notebook 02's run, else a short `clip.py:tiny` pre-training done here.

# %% [setup]

# %% [parameters]
TEACHER_DIR = ""          # "" = workdirs/demo, else notebook 02's run, else a short pre-training here
WORKDIR = "workdirs/notebooks/04_open_vocabulary"
METHOD = "maskclip_plus"  # configs/distill/<METHOD>.py (lseg: trained on base-class masks)
VARIANT = "tiny" if ACCELERATOR else "micro"   # the config's size
STEPS = 0                 # 0: the variant's own (micro 40, tiny 600)
NUM_SHOW = 4              # held-out scenes shown
FALLBACK_STEPS = 500      # the pre-training when no teacher exists (clip.py:tiny, batch 128)

# %%
import json

import numpy as np

import vlm_jax.runner
from vlm_jax import runs
from vlm_jax.data import transforms
from vlm_jax.distill import run as distill_run, seg_data, seg_evaluation, segmentation
from vlm_jax.distill import teacher as teacher_lib
from vlm_jax.evaluate import segmentation as seg
from vlm_jax.models.segmentation import segmenter


if not TEACHER_DIR:
    TEACHER_DIR = next((d for d in ("workdirs/demo", "workdirs/notebooks/02_pretrain") if os.path.isdir(d)), "")
if not TEACHER_DIR:  # no model: a short pre-training of the tiny CLIP (a few minutes on 2 CPU cores)
    pre = get_config("configs/pretrain/clip.py:tiny")
    pre.total_steps, pre.batch_size, pre.optimizer.warmup_steps = FALLBACK_STEPS, 128, 50
    pre.optimizer.lr, pre.evals = 2e-3, {}
    TEACHER_DIR = os.path.join(WORKDIR, "teacher")
    vlm_jax.runner.pretrain(pre, TEACHER_DIR)
print("teacher:", TEACHER_DIR)

config = get_config(f"configs/distill/{METHOD}.py:{VARIANT}")
config.teacher.checkpoint = TEACHER_DIR
config.teacher_cache.dir = os.path.join(WORKDIR, "teacher_cache")
if STEPS:
    config.total_steps = STEPS

# %% [markdown]
# ## Distil
# The teacher's refined MaskCLIP labels of the training images are computed once (cached by the teacher's
# fingerprint), then the student trains with the one training loop. The run evaluates teacher, student and the
# broadcast baseline (the global image embedding's class at every pixel) on held-out scenes.

# %%
run_dir = os.path.join(WORKDIR, "student")
result = distill_run.distill(config, run_dir)
rows = {"MaskCLIP teacher": "teacher/segmentation/", "teacher, refined": "teacher_refined/segmentation/",
        "broadcast": "broadcast/segmentation/", "student": "segmentation/"}
print(f"{'':18s} {'mIoU base':>9s} {'mIoU novel':>10s} {'hIoU':>6s}")
for who, p in rows.items():
    print(f"{who:18s} {100 * result[p + 'miou_base']:9.1f} {100 * result[p + 'miou_novel']:10.1f} "
          f"{100 * result[p + 'hiou']:6.1f}")

# %% [markdown]
# ## Base vs novel mIoU

# %%
x = np.arange(len(rows))
fig, ax = plt.subplots(figsize=(6.5, 3.5))
ax.bar(x - 0.2, [100 * result[p + "miou_base"] for p in rows.values()], 0.4, label="base classes")
ax.bar(x + 0.2, [100 * result[p + "miou_novel"] for p in rows.values()], 0.4, label="novel classes")
ax.set_xticks(x, list(rows))
ax.set_ylabel("mIoU (%)")
ax.legend()
show(fig)

# %% [markdown]
# ## Held-out scenes: the teacher's dense map vs the student's mask
# Columns: the image, the ground truth, the teacher's score map for one class of the scene (cosine of its dense
# features with that class's text embedding), the teacher's MaskCLIP labels, the student's labels.

# %%
teacher = teacher_lib.load_teacher(config.teacher)
resolved = segmentation.resolve(config, teacher)
eval_src = seg_data.make_source(resolved.data, "eval")
names = ["background"] + [f"{n}{'*' if nv else ''}" for n, nv in zip(eval_src.names, eval_src.novel)]
class_emb = teacher.text_embeddings(eval_src.names)
shown = seg_evaluation.eval_data(eval_src, NUM_SHOW)
_, teacher_pred = seg_evaluation.teacher_metrics(teacher, eval_src, class_emb, shown,
                                                 dense_size=int(resolved.method.dense_size),
                                                 refine=segmentation.refine_settings(resolved))
student = segmenter.build(segmentation.student_config(resolved, len(eval_src.names), closed_set=False).model)
student_pred = seg_evaluation.predict(seg_evaluation.segment_fn(student), runs.load_variables(run_dir),
                                      transforms.normalize(shown["image_uint8"], tuple(resolved.data.mean),
                                                           tuple(resolved.data.std)))
dense = teacher.dense(shown["image_uint8"], int(resolved.method.dense_size))   # [N, h, w, E]
palette = seg.label_palette(len(names))
size = shown["image_uint8"].shape[1]
fig, axes = plt.subplots(NUM_SHOW, 5, figsize=(11, 2.3 * NUM_SHOW), squeeze=False)
for i, row in enumerate(axes):
    present = [c for c in np.unique(shown["mask"][i]) if c > 0]
    c = next((c for c in present if eval_src.novel[c - 1]), present[0])   # a novel class when the scene has one
    heat = dense[i] @ class_emb[c - 1]
    row[0].imshow(shown["image_uint8"][i], interpolation="nearest")
    row[1].imshow(palette[shown["mask"][i]], interpolation="nearest")
    row[2].imshow(heat, cmap="jet", interpolation="bilinear")
    row[3].imshow(palette[teacher_pred[i]], interpolation="nearest")
    row[4].imshow(palette[student_pred[i]], interpolation="nearest")
    for ax, title in zip(row, ("image", "ground truth", f"teacher map: {names[c]}", "teacher (MaskCLIP)",
                               "student")):
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
    row[1].text(0, size + 6, ", ".join(names[c] for c in present), fontsize=7, va="top")
fig.tight_layout()
show(fig)

# %%
test_labels = np.concatenate([[0], np.nonzero(eval_src.test_mask)[0] + 1])   # background + the 48 test classes
counts = np.bincount(seg_evaluation.eval_data(eval_src)["mask"].ravel(), minlength=len(names))[test_labels]
chance = seg.chance_miou(counts)
print(f"chance mIoU (uniformly random labels over background + the test classes): {100 * chance:.2f}%")
print("headline:", json.dumps({"teacher_miou_base": result["teacher/segmentation/miou_base"],
                               "teacher_miou_novel": result["teacher/segmentation/miou_novel"],
                               "student_miou_base": result["segmentation/miou_base"],
                               "student_miou_novel": result["segmentation/miou_novel"],
                               "chance_miou": chance}))
