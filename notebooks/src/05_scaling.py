# %% [markdown]
# # 05 · Scaling: meshes, sharding, contrastive-loss memory, FLOPs and MFU
#
# One mesh with axes `data` (pure data parallel), `fsdp` (data parallel + parameters sharded, ZeRO-3 style) and
# `model` (tensor parallel); sizes come from `config.mesh` (`-1` takes the remaining devices), and one table of
# logical-axis rules (`vlm_jax.parallel.partitioning.DEFAULT_RULES`) maps parameter names (`embed`, `mlp`,
# `heads`, …) to mesh axes — so switching strategy is a config change, not a code change. On a laptop the first
# cell asks XLA for 8 simulated CPU devices (before JAX is imported); on a TPU / GPU runtime the real chips are
# used. The contrastive loss has a ring variant (`shard_map` + `ppermute`, recomputation in the backward; Inf-CL
# idea) whose per-device memory grows linearly in the batch instead of with the B/n × B logits.

# %% [setup] cpu_devices=8

# %% [parameters]
IMAGE_TOWER = {"kind": "vit", "variant": "mu/4", "image_size": 32, "pool_type": "gap", "width": 128, "depth": 2,
               "num_heads": 4, "mlp_dim": 512}   # a small ViT: heads and MLP split over `model`
TEXT_TOWER = {"kind": "text", "variant": "tiny", "width": 64, "depth": 2, "num_heads": 2, "mlp_dim": 256}
MESHES = {                                      # name -> config.mesh
    "data parallel": {"data": -1, "fsdp": 1, "model": 1},
    "FSDP": {"data": 1, "fsdp": -1, "model": 1},
    "FSDP + tensor": {"data": 1, "fsdp": -1, "model": 2},
}
BATCH = 256 if ACCELERATOR else 64              # global batch of the timed training step
TIMED_STEPS = 20 if ACCELERATOR else 5
LOSS_DIM = 512 if ACCELERATOR else 128          # embedding width in the loss-memory sweep
LOSS_BATCHES = [4096, 8192, 16384, 32768] if ACCELERATOR else [512, 1024, 2048, 4096]

# %%
import json
import math
import time

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vlm_jax import assembly
from vlm_jax.objectives import get_objective
from vlm_jax.parallel import mesh as mesh_lib, partitioning
from vlm_jax.train import flops as flops_lib
from vlm_jax.train.optim import make_optimizer
from vlm_jax.train.state import create_train_state
from vlm_jax.train.step import jit_train_step


n_dev = jax.device_count()
MESHES = {k: v for k, v in MESHES.items() if n_dev % max(1, v["model"]) == 0}  # a 1-chip runtime: no tensor split
config = get_config("configs/pretrain/clip.py:micro")
config.model.image, config.model.text, config.model.embed_dim = IMAGE_TOWER, TEXT_TOWER, 64
config.data.image_size = IMAGE_TOWER["image_size"]
config.batch_size = BATCH
parts = assembly.assemble(config)
abstract = assembly.abstract_variables(parts.model, parts.example)
rules = partitioning.rules_from_config(None)
print(f"{n_dev} devices ({jax.devices()[0].device_kind}); rules: {dict(rules)}")

# %% [markdown]
# ## Where each parameter lives, per mesh
# The same abstract parameters, three `config.mesh` settings: their `NamedSharding`s come from the logical names.

# %%
flat_abstract = traverse_util.flatten_dict(partitioning.unbox(abstract)["params"], sep="/")
total_bytes = sum(math.prod(a.shape) * a.dtype.itemsize for a in flat_abstract.values())
shown = next(k for k, a in flat_abstract.items() if "txt" in k and "mlp" in k.lower() and len(a.shape) == 2)
per_device, meshes = {}, {}
for name, sizes in MESHES.items():
    config.mesh = sizes
    mesh = mesh_lib.make_mesh(dict(config.mesh))
    meshes[name] = mesh
    shardings = traverse_util.flatten_dict(
        partitioning.logical_to_shardings(abstract, mesh, rules)["params"], sep="/")
    per_device[name] = sum(math.prod(s.shard_shape(flat_abstract[k].shape)) * flat_abstract[k].dtype.itemsize
                           for k, s in shardings.items())
    print(f"\n== {name}: mesh {dict(mesh.shape)}; {shown} {flat_abstract[shown].shape} -> {shardings[shown].spec}")
    x = jax.device_put(jnp.zeros(flat_abstract[shown].shape, flat_abstract[shown].dtype), shardings[shown])
    jax.debug.visualize_array_sharding(x)

# %% [markdown]
# ## The batch: split over `data` × `fsdp`
# A global batch [B, …] is sharded on its first axis over both data-parallel axes (`mesh.BATCH_AXES`); shown for
# the image batch flattened to [B, H·W·3] on the FSDP + tensor mesh: rows split over `fsdp`, replicated over `model`.

# %%
last = list(meshes)[-1]
batch_arr = jax.device_put(jnp.zeros((BATCH, IMAGE_TOWER["image_size"] ** 2 * 3)),
                           mesh_lib.batch_sharding(meshes[last], 2))
print(f"{last}: batch sharding {batch_arr.sharding.spec}")
jax.debug.visualize_array_sharding(batch_arr)

# %% [markdown]
# ## Parameter bytes per device

# %%
fig, ax = plt.subplots(figsize=(5.5, 3))
ax.bar(list(per_device), [b / 2**20 for b in per_device.values()], color="tab:blue")
ax.axhline(total_bytes / 2**20, color="gray", ls="--", label="all parameters (one copy)")
ax.set_ylabel("MiB per device")
ax.set_title(f"parameters ({total_bytes / 2**20:.2f} MiB) on {n_dev} devices")
ax.legend()
show(fig)
for name, b in per_device.items():
    print(f"{name:14s} {b / 2**20:7.3f} MiB per device ({total_bytes / b:.1f}x less than a full copy)")

# %% [markdown]
# ## Contrastive loss: dense vs ring memory against the batch
# The forward + backward of the CLIP loss w.r.t. (z^I, z^T, t) is compiled — never run — for a batch-sharded
# [B, D] pair on a `data` mesh of every device; `memory_analysis().temp_size_in_bytes` is the per-device scratch
# (what `benchmarks/loss_memory.py` prints). Dense holds a B/n × B logits block per device; ring, tiles.

# %%
data_mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "model": 1})


def loss_grad(impl):
    def f(zimg, ztxt, scale):
        out = {"zimg": zimg, "ztxt": ztxt, "logit_scale": scale}
        return get_objective("clip")(out, {}, mesh_axes=mesh_lib.BATCH_AXES, impl=impl)[0]
    return jax.value_and_grad(f, argnums=(0, 1, 2))


memory = {"dense": [], "ring": []}
for b in LOSS_BATCHES:
    emb = jax.ShapeDtypeStruct((b, LOSS_DIM), jnp.float32, sharding=mesh_lib.batch_sharding(data_mesh, 2))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=mesh_lib.replicated(data_mesh))
    for impl in memory:
        with jax.set_mesh(data_mesh):
            compiled = jax.jit(loss_grad(impl)).lower(emb, emb, scalar).compile()
        memory[impl].append(compiled.memory_analysis().temp_size_in_bytes)
    print(f"B={b:6d}: dense {memory['dense'][-1] / 2**20:8.2f} MiB  ring {memory['ring'][-1] / 2**20:8.2f} MiB "
          f"per device")
fig, ax = plt.subplots(figsize=(5.5, 3.5))
for impl, vals in memory.items():
    ax.plot(LOSS_BATCHES, [v / 2**20 for v in vals], marker="o", label=impl)
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("global batch B")
ax.set_ylabel("scratch MiB per device")
ax.set_title(f"CLIP loss fwd+bwd, D={LOSS_DIM}, {n_dev} devices")
ax.legend()
show(fig)

# %% [markdown]
# ## FLOPs and MFU of a training step
# Model FLOPs of one step (forward + the backward training needs) counted by XLA on the lowered
# `value_and_grad`, and analytically (2·params·tokens per matmul pass + attention; ×3 for training;
# `vlm_jax/train/flops.py`). MFU = model FLOP/s ÷ (devices × peak): the vendor bf16 peak on TPU/GPU, a measured
# float32 matmul rate on CPU (shared by the simulated devices). The step is the training loop's jitted step
# (`train.step.jit_train_step`) on the data-parallel mesh.

# %%
peak, peak_src = flops_lib.peak_flops_per_device()
mesh = data_mesh
tx, schedule = make_optimizer(config.optimizer, int(config.total_steps))
with jax.set_mesh(mesh):
    state, state_sh = create_train_state(parts.model, tx, parts.example, mesh=mesh, rules=rules, frozen=None,
                                         rng=jax.random.PRNGKey(0))
    step = jit_train_step(parts.model, parts.loss_fn, tx, schedule, state_sh, mesh=mesh, rules=rules)
    rng = np.random.default_rng(0)
    host = {"image": rng.normal(size=(BATCH, *parts.example["image"].shape[1:])).astype(np.float32),
            "text": rng.integers(1, parts.model.txt.vocab_size, size=(BATCH, parts.example["text"].shape[1]),
                                 dtype=np.int32)}
    batch = {k: jax.device_put(v, mesh_lib.batch_sharding(mesh, v.ndim)) for k, v in host.items()}
    xla_flops = flops_lib.xla_model_flops_per_step(parts.model, parts.loss_fn, batch)
    state, metrics = step(state, batch)          # compile + one warm-up step
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(TIMED_STEPS):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - t0
analytic = flops_lib.analytic_train_flops_per_sample(parts.model, parts.example["image"].shape[1:],
                                                     parts.example["text"].shape[1]) * BATCH
tp = flops_lib.throughput_metrics(BATCH * TIMED_STEPS, seconds, xla_flops, TIMED_STEPS, n_dev, peak)
print(f"model FLOPs per step: XLA {xla_flops / 1e9:.3f} GFLOP, analytic {analytic / 1e9:.3f} GFLOP "
      f"(batch {BATCH})")
print(f"{TIMED_STEPS} steps in {seconds:.2f} s: {tp['images_per_sec']:.0f} img/s, "
      f"{tp['tflops_per_device'] * 1e3:.2f} GFLOP/s per device, peak {peak / 1e9:.1f} GFLOP/s per device "
      f"({peak_src}) -> MFU {100 * tp['mfu']:.1f}%")

# %%
print("headline:", json.dumps({"dense_temp_bytes": memory["dense"][-1], "ring_temp_bytes": memory["ring"][-1],
                               "data_param_bytes_per_device": per_device["data parallel"],
                               "fsdp_param_bytes_per_device": per_device["FSDP"],
                               "xla_flops_per_step": xla_flops, "mfu": tp["mfu"]}))
