# %% [markdown]
# # 03 · Few-shot transfer: zero-shot vs CoOp vs Tip-Adapter vs a linear probe
#
# A synthetic distribution shift (`shifted_hues`: the pre-training classes with faded, hue-rotated paint) and the
# CoOp protocol (Zhou et al. 2022): k labelled images per class for training, a k-shot validation split from the
# training pool for model selection, a disjoint test split read once at the end. Methods:
#
# - **zero-shot** CLIP: the prompt-ensemble classifier, no training (Radford et al. 2021);
# - **CoOp**: learned context vectors in front of the class name, the CLIP text tower frozen (Zhou et al. 2022);
# - **Tip-Adapter**: a training-free key-value cache of the k-shot images blended with zero-shot logits
#   (Zhang et al. 2022);
# - **linear probe**: L-BFGS logistic regression on the frozen image embeddings (CLIP's few-shot baseline).
#
# Each cell of the grid is one call of `vlm_jax.transfer.run.transfer(config, workdir)` — exactly what
# `python -m vlm_jax.transfer --config=configs/transfer/<method>.py:tiny --workdir=DIR` runs (and
# `python -m vlm_jax.transfer.benchmark` loops over). The base model is `MODEL_DIR`, else the `make demo` run,
# else the run of notebook 02, else a short `clip.py:tiny` pre-training done here.

# %% [setup]

# %% [parameters]
MODEL_DIR = ""            # "" = workdirs/demo, else notebook 02's run, else a short pre-training here
WORKDIR = "workdirs/notebooks/03_transfer"
DATASET = "shifted_hues"  # a task of vlm_jax/data/synthetic_shift.py (or folder:ROOT / tfds:NAME with a real model)
METHODS = ["zeroshot", "coop", "tip_adapter", "linear_probe"]
SHOTS = [1, 4, 16] if ACCELERATOR else [1, 4]
SEEDS = [1, 2, 3] if ACCELERATOR else [1]
EPOCHS = 10 if ACCELERATOR else 4          # CoOp's training epochs (the tiny recipe: 10)
TEST_PER_CLASS = 16 if ACCELERATOR else 8
FALLBACK_STEPS = 500                       # the pre-training when no model exists (clip.py:tiny, batch 128)

# %%
import json

import numpy as np
from tqdm.auto import tqdm

import vlm_jax.runner
from vlm_jax.data import synthetic_shift
from vlm_jax.transfer.run import transfer


if not MODEL_DIR:
    MODEL_DIR = next((d for d in ("workdirs/demo", "workdirs/notebooks/02_pretrain") if os.path.isdir(d)), "")
if not MODEL_DIR:  # no model: a short pre-training of the tiny CLIP (a few minutes on 2 CPU cores)
    config = get_config("configs/pretrain/clip.py:tiny")
    config.total_steps, config.batch_size, config.optimizer.warmup_steps = FALLBACK_STEPS, 128, 50
    config.optimizer.lr, config.evals = 2e-3, {}
    MODEL_DIR = os.path.join(WORKDIR, "base")
    vlm_jax.runner.pretrain(config, MODEL_DIR)
print("base model:", MODEL_DIR)

# %% [markdown]
# ## The shift
# Training-distribution images (`base`) next to the same classes under the shift.

# %%
base = synthetic_shift.get_task("base", "test", 8, image_size=32)
shifted = synthetic_shift.get_task(DATASET, "test", 8, image_size=32)
fig, axes = plt.subplots(2, 8, figsize=(10, 3))
for j in range(8):
    for row, task, tag in ((0, base, "base"), (1, shifted, DATASET)):
        axes[row, j].imshow(task.images[j], interpolation="nearest")
        axes[row, j].set_axis_off()
        axes[row, j].set_title(f"{tag}\n{task.class_names[task.labels[j]]}" if j == 0 else
                               task.class_names[task.labels[j]], fontsize=7)
fig.tight_layout()
show(fig)

# %% [markdown]
# ## The grid: methods × shots × seeds
# A cell whose `results.json` exists is read back instead of re-run (delete WORKDIR to start over).

# %%
cells = [(m, k, s) for m in METHODS for k in SHOTS for s in SEEDS]
results = []
for method, shots, seed in tqdm(cells, desc="transfer runs"):
    cell_dir = os.path.join(WORKDIR, method, f"{shots}shot_seed{seed}")
    done = os.path.join(cell_dir, "results.json")
    if os.path.exists(done):
        with open(done) as f:
            results.append(json.load(f))
        continue
    c = get_config(f"configs/transfer/{method}.py:tiny")
    c.init.checkpoint, c.dataset, c.shots, c.seed = MODEL_DIR, DATASET, shots, seed
    c.test_per_class = TEST_PER_CLASS
    if c.epochs:       # the methods that train (CoOp); the training-free ones keep epochs = 0
        c.epochs = EPOCHS
    r = transfer(c, cell_dir, quiet=True)
    results.append(r)
    print(f"{method:13s} {shots:2d}-shot seed {seed}: top-1 {100 * r['top1']:5.1f}%  "
          f"(zero-shot {100 * r['zeroshot/top1']:5.1f}%)")
chance = results[0]["chance"]

# %% [markdown]
# ## Accuracy vs shots
# Reading the plot: the training-free methods (Tip-Adapter, the linear probe) use the k-shot images directly;
# CoOp starts from random context vectors and needs enough steps (EPOCHS × ⌈64·k / 32⌉) to pass the hand-written
# prompts — with the CPU settings it can stay below zero-shot (raise EPOCHS and SHOTS to see it overtake).

# %%
def mean_top1(method, shots):
    return float(np.mean([r["top1"] for r in results if r["method"] == method and r["shots"] == shots]))

fig, ax = plt.subplots(figsize=(5.5, 4))
for m in METHODS:
    ax.plot(SHOTS, [100 * mean_top1(m, k) for k in SHOTS], marker="o", label=m)
ax.axhline(100 * chance, color="gray", ls=":", label="chance")
ax.set_xscale("log", base=2)
ax.set_xticks(SHOTS, [str(k) for k in SHOTS])
ax.set_xlabel("shots per class")
ax.set_ylabel("test top-1 (%)")
ax.set_title(f"{DATASET}, mean over {len(SEEDS)} seed(s)")
ax.legend()
show(fig)

print("| method | " + " | ".join(f"{k} shots" for k in SHOTS) + " |")
for m in METHODS:
    print(f"| {m} | " + " | ".join(f"{100 * mean_top1(m, k):.1f}" for k in SHOTS) + " |")
print(f"chance {100 * chance:.1f}%")

# %%
print("headline:", json.dumps({"shots": max(SHOTS), "chance": chance,
                               **{m: mean_top1(m, max(SHOTS)) for m in METHODS}}))
