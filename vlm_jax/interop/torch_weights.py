"""Safe reading of PyTorch weight files into `{name: numpy array}` state dicts, without running their code.

Three formats are read:
- `.safetensors` (via the `safetensors` package; bfloat16 through its Flax reader, as numpy has no bfloat16); a
  header that lies about sizes or offsets is a `UserError`;
- `torch.save` files (`.pt`, `.pth`, `.bin`; zip or legacy) via `torch.load(map_location='cpu',
  weights_only=True)`, PyTorch's restricted unpickler, so no arbitrary object is ever unpickled (a pickle that
  names any other global, e.g. `os.system` in a `__reduce__` payload, is a `UserError` and its code never runs);
- TorchScript archives (OpenAI's original CLIP `.pt` files, made by `torch.jit.save`), which `torch.load` refuses
  with `weights_only=True` and `torch.jit.load` would execute. Here the archive's `data.pkl` is unpickled by
  `_ScriptUnpickler`, which resolves no global except an allow-list of tensor-rebuild functions (re-implemented
  on numpy) and `collections.OrderedDict`; every `__torch__.*` class becomes an inert attribute holder, so the
  module tree's tensors come out by attribute path (`visual.conv1.weight`, …) and no code from the file runs.

Training checkpoints are unwrapped (`{'state_dict': …}`, `{'model': …}`) and a `module.`
(DistributedDataParallel) or `_orig_mod.` (torch.compile) prefix is stripped.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from vlm_jax.errors import UserError

EXPORT_HINT = ("export a plain state dict on a machine with open_clip: `model = open_clip.create_model(ARCH, "
               "pretrained=TAG); torch.save(model.state_dict(), 'model.pt')`")

# TorchScript storage classes -> numpy dtypes
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


def to_numpy(value: Any) -> np.ndarray:
  """A torch tensor (any dtype, incl. bfloat16), jax array or array-like as a numpy array on the host."""
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch
    t = value.detach().cpu()
    if str(t.dtype) == "torch.bfloat16":
      import torch  # noqa: PLC0415  (only reached with torch tensors)
      return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
  return np.asarray(value)


class _ScriptObject:
  """Inert stand-in for a TorchScript class instance: keeps the pickled attribute dict, runs nothing."""

  def __init__(self, *args):
    self.args = args
    self.state = {}

  def __setstate__(self, state):
    self.state = state if isinstance(state, dict) else {"state": state}


class _ScriptUnpickler(pickle.Unpickler):
  """Unpickles a TorchScript `data.pkl` into `_ScriptObject`s and numpy arrays; rejects every other global."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
    super().__init__(file)
    self.archive, self.prefix = archive, prefix
    self.storages: dict[str, np.ndarray] = {}

  def find_class(self, module, name):
    if module.startswith("__torch__"):
      return type(name, (_ScriptObject,), {})
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch" and name in _STORAGE_DTYPES:
      return _STORAGE_DTYPES[name]
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return lambda data, *_: data
    if module == "torch.jit._pickle" and name.startswith("build_"):
      return lambda x: list(x) if isinstance(x, (list, tuple)) else x
    if module == "torch.jit._pickle" and name == "restore_type_tag":
      return lambda x, *_: x
    raise UserError(f"TorchScript archive refers to {module}.{name}, which a safe reader will not resolve; "
                    f"{EXPORT_HINT}")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise UserError(f"TorchScript archive has an unsupported persistent record {str(pid)[:80]}; {EXPORT_HINT}")
    _, dtype, key, _, numel = pid
    if key not in self.storages:
      raw = self.archive.read(f"{self.prefix}data/{key}")
      self.storages[key] = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"), count=numel)
    return self.storages[key]


def _rebuild_tensor(storage, offset, size, stride, *_):
  """numpy twin of `torch._utils._rebuild_tensor_v2`: a strided view of the storage, copied out."""
  item = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * item for s in stride))
  return np.array(view, dtype=storage.dtype.newbyteorder("="))


def _walk(obj, path: str, out: dict) -> None:
  """Collects the tensors of a pickled TorchScript module tree by attribute path."""
  if isinstance(obj, np.ndarray):
    out[path] = obj
  elif isinstance(obj, _ScriptObject):
    for k, v in obj.state.items():
      if k != "training":
        _walk(v, f"{path}.{k}" if path else str(k), out)


def is_torchscript(path: str) -> bool:
  """True for a zip archive written by `torch.jit.save` (it carries `constants.pkl` / `code/`)."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def read_torchscript(path: str) -> dict[str, np.ndarray]:
  """Tensors (parameters and buffers) of a TorchScript archive by module path, without executing it."""
  with zipfile.ZipFile(path) as z:
    pkls = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
      raise UserError(f"{path}: not a TorchScript archive this reader understands; {EXPORT_HINT}")
    prefix = pkls[0][:-len("data.pkl")]
    with z.open(pkls[0]) as f:
      try:
        root = _ScriptUnpickler(f, z, prefix).load()
      except UserError:
        raise
      except Exception as e:  # noqa: BLE001  (any malformed pickle is the user's file, not our bug)
        raise UserError(f"{path}: cannot read the TorchScript archive safely ({type(e).__name__}: {e}); "
                        f"{EXPORT_HINT}") from None
  out: dict[str, np.ndarray] = {}
  _walk(root, "", out)
  if not out:
    raise UserError(f"{path}: no tensors found in the TorchScript archive; {EXPORT_HINT}")
  return out


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415
  except ImportError:
    raise UserError(f"reading {path} needs the safetensors package (pip install 'vlm_jax[interop]')") from None
  try:
    return _read_safetensors_checked(path, safe_open)
  except (SafetensorError, OSError, ValueError) as e:  # a header that lies about sizes / offsets, a cut file, …
    why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    raise UserError(f"{path} is not a valid safetensors file ({why})") from None


def _read_safetensors_checked(path: str, safe_open) -> dict[str, np.ndarray]:
  out, bf16 = {}, []
  with safe_open(path, framework="numpy") as f:
    for k in f.keys():
      if f.get_slice(k).get_dtype() == "BF16":
        bf16.append(k)
      else:
        out[k] = f.get_tensor(k)
  if bf16:
    import jax  # noqa: PLC0415
    with jax.default_device(jax.devices("cpu")[0]), safe_open(path, framework="flax") as f:
      out.update({k: np.asarray(f.get_tensor(k)) for k in bf16})
  return out


def _torch_load(path: str) -> Any:
  try:
    import torch  # noqa: PLC0415
  except ImportError:
    raise UserError(f"reading {path} needs PyTorch (pip install 'vlm_jax[interop]'), or convert it to "
                    ".safetensors first") from None
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    # torch's message opens with advice to retry with weights_only=False (never do that on an untrusted file);
    # the line naming the refused global is the useful one
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    why = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "")
    raise UserError(f"{path} holds objects other than tensors, which are not unpickled for safety "
                    f"({why[:200]}); {EXPORT_HINT}") from None
  except Exception as e:  # noqa: BLE001 - a cut or malformed file: torch's unpickler raises RuntimeError, EOFError,
    # ValueError, BadZipFile, but on arbitrary bytes also IndexError, KeyError, … (the user's file, not our bug)
    why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    raise UserError(f"{path} is not a readable torch.save file ({why})") from None


def _unwrap(obj: Any, path: str) -> dict:
  for key in ("state_dict", "model", "module"):
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
      obj = obj[key]
  if not isinstance(obj, dict) or not obj:
    raise UserError(f"{path} does not contain a state dict (got {type(obj).__name__}); {EXPORT_HINT}")
  out = {}
  for k, v in obj.items():
    for pre in ("module.", "_orig_mod."):
      if k.startswith(pre):
        k = k[len(pre):]
    if hasattr(v, "shape") or isinstance(v, (np.ndarray, int, float)):
      out[k] = to_numpy(v)
  return out


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a PyTorch weight file (.safetensors, .pt/.pth/.bin, or a TorchScript archive) as numpy, safely."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise UserError(f"no such weight file: {path}")
  if path.endswith(".safetensors"):
    return _unwrap(_read_safetensors(path), path)
  if is_torchscript(path):
    return read_torchscript(path)
  return _unwrap(_torch_load(path), path)
