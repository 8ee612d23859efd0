# %% [markdown]
# # 01 · Zero-shot quick start
#
# Load a CLIP-style model with `vlm_jax.inference.load` (the one-call loader), classify images with prompt
# templates (Radford et al. 2021, §3.1.4: the class embedding is the normalised mean of the template embeddings),
# show each image with its top-5 classes, and retrieve images from captions.
#
# The model is, in this order: `MODEL_DIR` (a `vlm_jax` run or a directory written by `python -m vlm_jax.convert`
# from open_clip / Hugging Face weights), the `make demo` run `workdirs/demo`, or — when neither exists — a
# `configs/pretrain/clip.py:micro` CLIP pre-trained here for `FALLBACK_STEPS` steps (seconds on a CPU).
# The images are the embedded procedural dataset (shapes × colours), so nothing is downloaded.

# %% [setup]

# %% [parameters]
MODEL_DIR = ""             # "" = workdirs/demo when present, else a :micro model trained below
WORKDIR = "workdirs/notebooks/01_zero_shot"   # where the fallback model is trained
FALLBACK_STEPS = 1000 if ACCELERATOR else 300  # steps of the fallback :micro pre-training
FALLBACK_BATCH = 256 if ACCELERATOR else 64
NUM_SHOW = 6               # images shown with their top-5 bars
NUM_EVAL = 256             # images scored for the top-1 accuracy
NUM_RETRIEVAL = 64         # gallery size of the retrieval grid
TEMPLATES = "synthetic"    # a bundled template set ('synthetic', 'clip_imagenet', …), a .txt path or a list

# %%
import json

import numpy as np

import vlm_jax.inference
import vlm_jax.runner
from vlm_jax import config_lib
from vlm_jax.data import synthetic_eval


if not MODEL_DIR and os.path.isdir("workdirs/demo"):
    MODEL_DIR = "workdirs/demo"
if not MODEL_DIR:  # no model yet: a :micro CLIP, pre-trained here (the same loop as `python -m vlm_jax.pretrain`)
    config = get_config("configs/pretrain/clip.py:micro")
    config.total_steps, config.batch_size = FALLBACK_STEPS, FALLBACK_BATCH
    config.log_every_steps, config.optimizer.warmup_steps, config.optimizer.lr = 20, 20, 3e-3
    config.data.synthetic = {"num_train": 64 * FALLBACK_BATCH, "shard_size": 8 * FALLBACK_BATCH}
    vlm_jax.runner.pretrain(config, WORKDIR)
    MODEL_DIR = WORKDIR
model = vlm_jax.inference.load(MODEL_DIR)
print(f"model {MODEL_DIR}: image size {model.image_size}, embedding dim {model.model.embed_dim}, "
      f"logit scale {model.logit_scale:.1f}")

# %% [markdown]
# ## Classify with prompt templates
# `model.classify(images, class_names, templates)` preprocesses the images (CLIP's eval transform), builds the
# ensemble text classifier and returns softmax probabilities over the classes.

# %%
# The procedural data of the model's config (or the embedded default when the model was trained on other data)
data_config = model.config.data if model.config.data.get("name") == "synthetic" else config_lib.tiny_run()["data"]
from vlm_jax.data import pipeline
class_names = list(pipeline.dataset_info(data_config)["class_names"])
test = synthetic_eval.labelled_set(data_config, "eval_seen", image_size=model.image_size)
order = np.random.default_rng(0).permutation(len(test["label"]))[:NUM_EVAL]
images, labels = test["image_uint8"][order], test["label"][order]
probs = model.classify(images, class_names, TEMPLATES)
top1 = float(np.mean(probs.argmax(1) == labels))
chance = 1.0 / len(class_names)
print(f"{len(class_names)} classes, templates {TEMPLATES!r}: e.g. {class_names[:3]}")
print(f"zero-shot top-1 on {len(labels)} held-out images: {100 * top1:.1f}% (chance {100 * chance:.1f}%)")

fig, axes = plt.subplots(NUM_SHOW, 2, figsize=(7, 1.6 * NUM_SHOW), gridspec_kw={"width_ratios": [1, 2.2]})
for i, (ax_img, ax_bar) in enumerate(axes):
    ax_img.imshow(images[i], interpolation="nearest")
    ax_img.set_axis_off()
    ax_img.set_title(class_names[labels[i]], fontsize=8)
    top = np.argsort(-probs[i])[:5][::-1]
    ax_bar.barh(range(5), probs[i, top], color=["tab:green" if t == labels[i] else "tab:gray" for t in top])
    ax_bar.set_yticks(range(5), [class_names[t] for t in top], fontsize=8)
    ax_bar.set_xlim(0, 1)
axes[-1, 1].set_xlabel("probability (green: the true class)")
fig.tight_layout()
show(fig)

# %% [markdown]
# ## Text → image retrieval
# Captions of held-out multi-object scenes are the queries; the gallery is their images. Each row shows a
# caption's five nearest images by cosine similarity (green frame: the image the caption was written for).

# %%
ret = synthetic_eval.retrieval_set(data_config, image_size=model.image_size, num_images=NUM_RETRIEVAL,
                                   captions_per_image=1)
captions = [c[0] for c in ret["captions"]]
z_img = model.encode_image(ret["image"])
z_txt = model.encode_text(captions)
sim = z_txt @ z_img.T                       # [queries, gallery]
ranks = np.argsort(-sim, axis=1)
recall = {k: float(np.mean([i in ranks[i, :k] for i in range(len(captions))])) for k in (1, 5)}
print(f"text->image R@1 {100 * recall[1]:.1f}%  R@5 {100 * recall[5]:.1f}%  "
      f"(chance {100 / NUM_RETRIEVAL:.1f}% / {500 / NUM_RETRIEVAL:.1f}%)")

queries = range(4)
fig, axes = plt.subplots(len(queries), 5, figsize=(8, 2 * len(queries)))
for row, q in zip(axes, queries):
    for j, ax in enumerate(row):
        g = ranks[q, j]
        ax.imshow(ret["image_uint8"][g], interpolation="nearest")
        ax.set_xticks([]); ax.set_yticks([])
        for s in ax.spines.values():
            s.set_color("tab:green" if g == q else "lightgray"); s.set_linewidth(3)
    row[0].set_title(captions[q], fontsize=8, loc="left")
fig.tight_layout()
show(fig)

# %%
print("headline:", json.dumps({"zeroshot_top1": top1, "chance": chance, "retrieval_r1": recall[1],
                               "retrieval_chance": 1 / NUM_RETRIEVAL}))
