# %% [markdown]
# # 02 · Pre-training CLIP
#
# Render the embedded synthetic dataset into tar shards, pre-train a CLIP (Radford et al. 2021: the symmetric
# InfoNCE loss over the global batch, `configs/pretrain/clip.py`) with a live loss curve, then evaluate it:
# zero-shot accuracy on seen vs unseen (shape, colour) pairs, the confusion matrix, and MaskCLIP heat-maps
# (Zhou et al. 2022: the value path of the last block gives dense features in the joint space).
#
# On CPU the `:micro` config runs for a few hundred steps; on an accelerator the `:tiny` config (the `make demo`
# run) runs for its full schedule. Everything here is what `python -m vlm_jax.pretrain --config=… --workdir=…`
# does: `vlm_jax.runner.pretrain(config, workdir)` is the same call.

# %% [setup]

# %% [parameters]
CONFIG = "tiny" if ACCELERATOR else "micro"   # configs/pretrain/clip.py:<CONFIG>
STEPS = 900 if ACCELERATOR else 300           # pre-training steps
BATCH = 256 if ACCELERATOR else 64            # global batch
LR = 1e-3 if ACCELERATOR else 3e-3
NUM_TRAIN = 1 << 16 if ACCELERATOR else 4096  # rendered training images
WORKDIR = "workdirs/notebooks/02_pretrain"
NUM_HEATMAPS = 4                              # scenes shown with MaskCLIP heat-maps

# %%
import io
import json
import shutil
import threading
import time

from IPython import display as ipd
import numpy as np
from PIL import Image

import vlm_jax.inference
import vlm_jax.runner
from vlm_jax.data import pipeline, shards, synthetic_shards
from vlm_jax.evaluate import segmentation as seg_eval, zeroshot


config = get_config(f"configs/pretrain/clip.py:{CONFIG}")
config.total_steps, config.batch_size, config.optimizer.lr = STEPS, BATCH, LR
config.optimizer.warmup_steps = max(1, STEPS // 15)
config.log_every_steps, config.checkpoint_every_steps = 10, STEPS
config.eval_every_steps = 0
config.evals = {}           # evaluated below, in the notebook
config.data.synthetic = {"num_train": NUM_TRAIN, "shard_size": max(256, NUM_TRAIN // 8)}
print(config.model)

# %% [markdown]
# ## The synthetic shards
# `synthetic_shards.ensure_shards` renders the procedural training split once (content-addressed under
# `$VLM_JAX_CACHE`, default `~/.cache/vlm_jax`) in the img2dataset layout: `{key}.png` + `{key}.txt` (+ `.cls`,
# `.json`). Pre-training streams them like any other shards.

# %%
pattern = synthetic_shards.ensure_shards(dict(config.data.synthetic), int(config.data.image_size))
files = [p for group, _ in shards.expand_shards(pattern) for p in group]
print(f"{len(files)} shards, e.g. {files[0]}")
samples = []
for item, _ in shards.read_shard(files[0]):
    samples.append(item)
    if len(samples) == 8:
        break
fig, axes = plt.subplots(2, 4, figsize=(10, 5.5))
for ax, s in zip(axes.flat, samples):
    ax.imshow(Image.open(io.BytesIO(s.image)), interpolation="nearest")
    ax.set_title("\n".join(s.caption[i:i + 28] for i in range(0, len(s.caption), 28)), fontsize=7)
    ax.set_axis_off()
fig.tight_layout()
show(fig)

# %% [markdown]
# ## Pre-train with a live loss curve
# The loop runs in a background thread; this cell redraws `metrics.jsonl` (one JSON object per logged step)
# every few seconds until it finishes. Re-running the cell starts from scratch (the workdir is cleared).

# %%
shutil.rmtree(WORKDIR, ignore_errors=True)
done = {}


def _run():
    try:
        done["result"] = vlm_jax.runner.pretrain(config, WORKDIR, quiet=True)
    except BaseException as e:  # re-raised in the cell below the loop
        done["error"] = e


def read_metrics():
    path = os.path.join(WORKDIR, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


thread = threading.Thread(target=_run, daemon=True)
t0 = time.time()
thread.start()


def png(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return ipd.Image(buf.getvalue())


fig, ax = plt.subplots(figsize=(6, 3.5))
handle = ipd.display(png(fig), display_id=True)
while True:
    alive = thread.is_alive()
    rows = [r for r in read_metrics() if "loss" in r]
    ax.clear()
    if rows:
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="contrastive loss")
        ax.plot([r["step"] for r in rows], [np.log(BATCH)] * len(rows), "--",
                color="gray", label="log B (a random model)")
        ax.legend(loc="upper right")
    ax.set_xlim(0, STEPS)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{CONFIG}: step {rows[-1]['step'] if rows else 0}/{STEPS}, {time.time() - t0:.0f} s")
    handle.update(png(fig))
    if not alive:
        break
    thread.join(timeout=3.0)
plt.close(fig)
if "error" in done:
    raise done["error"]
rows = read_metrics()
print(f"trained {STEPS} steps in {time.time() - t0:.0f} s; final loss {rows[-1]['loss']:.3f} "
      f"(log B = {np.log(BATCH):.3f})")

# %% [markdown]
# ## Zero-shot: seen vs unseen (shape, colour) pairs
# Sixteen (shape, colour) pairs never appear in training captions ('unseen'); both splits are classified over
# all 64 classes with the synthetic prompt templates, so chance is 1/64.

# %%
model = vlm_jax.inference.load(WORKDIR)
data_config = model.config.data
res = zeroshot.evaluate_synthetic(model.encode_image, model.encode_text, model.tokenizer, data_config=data_config,
                                  image_size=model.image_size, prefix="")
chance = res["chance"]
for k in ("seen_top1", "unseen_top1", "seen_colour_acc", "seen_shape_acc", "top5"):
    print(f"{k:16s} {100 * res[k]:5.1f}%")
print(f"chance           {100 * chance:5.1f}%")
fig, ax = plt.subplots(figsize=(5, 3))
keys = ["seen_top1", "unseen_top1", "seen_shape_acc", "seen_colour_acc"]
ax.bar(keys, [100 * res[k] for k in keys], color=["tab:blue", "tab:orange", "tab:gray", "tab:gray"])
ax.axhline(100 * chance, color="red", ls="--", label="chance (top-1)")
ax.set_ylabel("%")
ax.legend()
plt.xticks(rotation=20)
show(fig)

# %% [markdown]
# ## The confusion matrix (true × predicted class, both splits)

# %%
info = pipeline.dataset_info(data_config)
names = list(info["class_names"])
class_emb = model.class_embeddings(names, "synthetic")
logits, labels = [], []
for split in ("eval_seen", "eval_unseen"):
    arr = pipeline.make_eval_arrays(data_config, split, image_size=model.image_size)
    logits.append(model.encode_image(arr["image"]) @ class_emb.T)
    labels.append(arr["class"])
logits, labels = np.concatenate(logits), np.concatenate(labels)
cm = zeroshot.confusion_matrix(logits.argmax(1), labels, len(names))
fig, ax = plt.subplots(figsize=(7, 6))
im = ax.imshow(cm / np.maximum(cm.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
ticks = range(0, len(names), 8)
ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90, fontsize=7)
ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=7)
ax.set_xlabel("predicted")
ax.set_ylabel("true")
fig.colorbar(im, label="fraction of the true class")
show(fig)

# %% [markdown]
# ## MaskCLIP heat-maps
# `model.encode_dense` gives per-location embeddings in the joint space; their cosine with a class's text
# embedding is a heat-map of where that class is (no training for this: Zhou et al. 2022).

# %%
scenes = seg_eval.synthetic_scenes(data_config, image_size=model.image_size, num_images=NUM_HEATMAPS)
dense = model.encode_dense(scenes["image"])                     # [N, h, w, D]
fig, axes = plt.subplots(NUM_HEATMAPS, 3, figsize=(7, 2.3 * NUM_HEATMAPS), squeeze=False)
for i, row in enumerate(axes):
    present = [c - 1 for c in np.unique(scenes["mask"][i]) if c > 0][:2]
    row[0].imshow(scenes["image_uint8"][i], interpolation="nearest")
    row[0].set_title("image", fontsize=8)
    for ax, c in zip(row[1:], present):
        heat = dense[i] @ class_emb[c]
        ax.imshow(scenes["image_uint8"][i], interpolation="nearest")
        ax.imshow(heat, cmap="jet", alpha=0.5, interpolation="bilinear",
                  extent=(-0.5, model.image_size - 0.5, model.image_size - 0.5, -0.5))
        ax.set_title(names[c], fontsize=8)
    for ax in row:
        ax.set_axis_off()
fig.tight_layout()
show(fig)

# %%
print("headline:", json.dumps({"seen_top1": res["seen_top1"], "unseen_top1": res["unseen_top1"],
                               "chance": chance, "final_loss": rows[-1]["loss"]}))
