"""Device mesh from config, and multi-process start-up.

Axes are always ('data', 'fsdp', 'model'): `data` is pure data parallelism, `fsdp` is data parallelism with
parameters sharded over it, `model` is tensor parallelism. Sizes come from config; one size may be -1 and takes
the remaining devices. Axis types are `AxisType.Auto` (GSPMD propagation guided by logical constraints); this is
the one place that choice is made.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from vlm_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")  # the global batch is split over both data-parallel axes


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves config sizes (one may be -1) to a full shape over `num_devices`."""
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise UserError(f"unknown mesh axes {sorted(unknown)}; use {list(MESH_AXES)}")
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  if sum(s == -1 for s in shape) > 1:
    raise UserError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, shape))}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if known <= 0 or num_devices % known:
      raise UserError(f"mesh {dict(zip(MESH_AXES, shape))} does not divide {num_devices} devices")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise UserError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                    f"{num_devices} are available")
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int] | None = None, devices=None) -> Mesh:
  """Builds the ('data', 'fsdp', 'model') mesh; default: every device on `data`."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(dict(sizes or {"data": -1}), len(devices))
  try:
    from jax.experimental import mesh_utils  # topology-aware order on TPU/GPU
    dev_array = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # CPU / odd counts: plain order
    dev_array = np.asarray(devices).reshape(shape)
  return Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Sharding of an array whose leading axis is the global batch."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def launcher(environ: Mapping[str, str] | None = None) -> str | None:
  """Which multi-process launcher started this process: 'env' (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID, set by launch/*.sh and the tests), 'tpu' (a multi-host Cloud TPU slice: TPU_WORKER_HOSTNAMES
  lists several workers), 'slurm' (SLURM_NTASKS > 1), or None for a single process."""
  env = os.environ if environ is None else environ
  if env.get("JAX_COORDINATOR_ADDRESS") and int(env.get("JAX_NUM_PROCESSES", "1")) > 1:
    return "env"
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
    return "tpu"
  if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  return None


TIMEOUT_ENV = "VLM_JAX_DISTRIBUTED_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 100  # JAX's own default heartbeat timeout


def distributed_timeout_s(environ: Mapping[str, str] | None = None) -> int:
  """Seconds after which the coordination service declares a process that stopped sending heartbeats dead and
  stops the others ($VLM_JAX_DISTRIBUTED_TIMEOUT_S, default 100; `jax.distributed.initialize`'s
  `heartbeat_timeout_seconds`)."""
  env = os.environ if environ is None else environ
  raw = env.get(TIMEOUT_ENV, "").strip()
  if not raw:
    return DEFAULT_TIMEOUT_S
  try:
    value = int(float(raw))
  except (ValueError, OverflowError):
    value = 0
  if value < 1:
    raise UserError(f"{TIMEOUT_ENV}={raw!r} must be a whole number of seconds ≥ 1")
  return value


def maybe_initialize_distributed() -> None:
  """Calls `jax.distributed.initialize()` when launched as several processes (see `launcher`).

  With the launcher variables the coordinator, process count and id are passed explicitly and, on CPU, gloo
  collectives are selected so multi-process CPU runs (and tests) work. On a Cloud TPU slice and under SLURM, JAX
  detects the cluster itself (the TPU metadata server; SLURM_* variables). Every kind gets the heartbeat timeout
  of `distributed_timeout_s`, and a process whose collective fails because another process died ends with one
  `error:` line (`exit_if_process_lost`).
  """
  if jax.distributed.is_initialized():
    return
  kind = launcher()
  if kind is None:
    return
  timeout = distributed_timeout_s()
  if kind == "env":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only affects the CPU backend
    jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]),
                               heartbeat_timeout_seconds=timeout)
  else:  # "tpu", "slurm"
    jax.distributed.initialize(heartbeat_timeout_seconds=timeout)
  previous = sys.excepthook

  def excepthook(kind_, e, tb):  # an uncaught error: one line and a quick exit when a peer is gone
    exit_if_process_lost(e)
    previous(kind_, e, tb)
  sys.excepthook = excepthook


# what a collective or the coordination service raises when another process died or became unreachable
_LOST = ("Connection reset by peer", "Connection closed by peer", "Connection refused", "Socket closed",
         "stopped sending heartbeats", "Failed to send RPC to coordination service")


def exit_if_process_lost(e: BaseException) -> None:
  """When `e` (uncaught) says another process of this multi-process run is gone, prints one `error:` line and
  exits with status 1 at once; otherwise returns.

  A dead peer fails the next cross-process collective (gloo sees the connection reset). Exiting normally would
  then block in JAX's exit-time shutdown until the heartbeat timeout and end in a C++ abort with a stack trace;
  `os._exit` skips that (the run is lost either way: rerun every process to resume from the last checkpoint)."""
  text = " ".join(str(e).split())
  if not isinstance(e, jax.errors.JaxRuntimeError) or not any(m in text for m in _LOST):
    return
  print(f"error: process {jax.process_index()} of {jax.process_count()} lost contact with another process "
        f"(it died or is unreachable): {text[:240]}; rerun all processes to resume from the last checkpoint "
        f"(a process silent for {TIMEOUT_ENV}={distributed_timeout_s()} s is declared dead)",
        file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(1)
