"""Linear probe and few-shot linear probe on frozen image features (Radford et al. 2021, CLIP §3.2, app. A.3).

Model: multinomial logistic regression on standardised features x̂ = (x − μ)/σ (μ, σ per dimension from the
rows being fitted — never the test rows), minimising

    L(W, b) = Σ_i w_i · CE(softmax(x̂_i W + b), y_i) / Σ_i w_i  +  (λ/2) ‖W‖²_F        (bias unpenalised)

with w_i ∈ {0, 1} masking padding rows. This is scikit-learn's `LogisticRegression(C)` used by CLIP up to the
standardisation, with λ = 1/(C·n). It is minimised from zero by full-batch L-BFGS (`optax.lbfgs`, zoom line
search) for at most `steps` iterations, stopping early once ‖∇L‖ ≤ `tol` (tol=0: exactly `steps`). The rows
are sharded over the mesh's batch axes, so the sums over examples are cross-device reductions; one compiled
fit serves every λ and every training subset (rows are padded to one size).

Protocol (CLIP app. A.3): λ is swept over a log grid; each value is fitted on the training set minus a
stratified validation split carved from it (`val_fraction`) and scored on that split; the best λ (ties → the
stronger) is refitted on train+val and the test set is scored once. `select_l2` takes no test data at all.

Few-shot (k-shot): per seed, k training images per class are drawn from the training set, plus a disjoint k-shot
draw as the validation set for choosing λ (the linear-probe baseline protocol of CoOp, Zhou et al. 2022); the
classifier fitted on the k shots with the chosen λ is scored on test. Reported: mean and (population) std over
seeds, as `<k>shot_top1` and `<k>shot_top1_std`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlm_jax.errors import UserError
from vlm_jax.parallel import mesh as mesh_lib

L2_GRID = tuple(float(x) for x in np.logspace(-6, 0, 7))
STEPS = 300  # L-BFGS iterations at most …
TOL = 1e-5  # … fewer once the gradient norm is this small (0: always STEPS)


def _fit_one(x, onehot, w, l2, tol, *, steps: int, standardize: bool):
  """One L-BFGS fit for one λ (at most `steps` iterations, fewer once ‖∇L‖ ≤ tol); returns (mu, sd, W, b)."""
  total = jnp.sum(w)
  if standardize:
    mu = jnp.sum(x * w[:, None], axis=0) / total
    sd = jnp.sqrt(jnp.sum(jnp.square(x - mu) * w[:, None], axis=0) / total) + 1e-6
  else:
    mu, sd = jnp.zeros(x.shape[1], x.dtype), jnp.ones(x.shape[1], x.dtype)
  xs = (x - mu) / sd

  def loss(p):
    kernel, bias = p
    logp = jax.nn.log_softmax(xs @ kernel + bias, axis=-1)
    ce = -jnp.sum(onehot * logp, axis=-1)
    return jnp.sum(w * ce) / total + 0.5 * l2 * jnp.sum(jnp.square(kernel))

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)
  params = (jnp.zeros((x.shape[1], onehot.shape[1]), x.dtype), jnp.zeros((onehot.shape[1],), x.dtype))

  def cond(carry):
    i, _, _, grad_norm = carry
    return (i < steps) & (grad_norm > tol)

  def body(carry):
    i, p, state, _ = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
    return i + 1, optax.apply_updates(p, updates), state, optax.tree_utils.tree_norm(grad)

  init = (jnp.zeros((), jnp.int32), params, opt.init(params), jnp.array(jnp.inf, x.dtype))
  _, params, _, _ = jax.lax.while_loop(cond, body, init)
  return mu, sd, params[0], params[1]


@functools.lru_cache(maxsize=8)
def _compiled_fit(mesh, steps: int, standardize: bool):
  """`_fit_one` jitted once per (mesh, steps, standardize), results replicated on every device and process."""
  return jax.jit(functools.partial(_fit_one, steps=steps, standardize=standardize),
                 out_shardings=mesh_lib.replicated(mesh))


@dataclasses.dataclass
class Probe:
  """Fitted classifiers, one per λ: mu, sd [G, D], kernel [G, D, C], bias [G, C] (numpy)."""
  l2s: np.ndarray
  mu: np.ndarray
  sd: np.ndarray
  kernel: np.ndarray
  bias: np.ndarray

  def logits(self, x: np.ndarray, g: int) -> np.ndarray:
    return ((np.asarray(x, np.float32) - self.mu[g]) / self.sd[g]) @ self.kernel[g] + self.bias[g]

  def accuracy(self, x: np.ndarray, y: np.ndarray, g: int) -> float:
    return float(np.mean(self.logits(x, g).argmax(1) == y))


def fit(x: np.ndarray, y: np.ndarray, num_classes: int, l2s: Sequence[float], *, steps: int = STEPS,
        tol: float = TOL, standardize: bool = True, pad_to: int = 0, mesh=None) -> Probe:
  """Fits one classifier per λ in `l2s` on rows x [N, D], labels y [N] (rows padded to `pad_to` and to a
  multiple of the data-parallel size, then sharded over the batch axes of `mesh` or the current mesh)."""
  from vlm_jax.embedding.batched import current_mesh  # noqa: PLC0415
  mesh = mesh or current_mesh()
  dp = mesh_lib.data_parallel_size(mesh)
  n = len(x)
  n_pad = -(-max(n, pad_to) // dp) * dp
  xp = np.zeros((n_pad, x.shape[1]), np.float32)
  xp[:n] = x
  onehot = np.zeros((n_pad, num_classes), np.float32)
  onehot[np.arange(n), np.asarray(y)] = 1.0
  w = np.zeros((n_pad,), np.float32)
  w[:n] = 1.0
  put = lambda a: jax.device_put(a, mesh_lib.batch_sharding(mesh, a.ndim))  # noqa: E731
  fit_fn, fits = _compiled_fit(mesh, int(steps), bool(standardize)), []
  with jax.set_mesh(mesh):
    xp, onehot, w = put(xp), put(onehot), put(w)
    for l2 in l2s:  # one compiled fit serves every λ (a traced scalar)
      fits.append([np.asarray(a) for a in fit_fn(xp, onehot, w, np.float32(l2), np.float32(tol))])
  mu, sd, kernel, bias = (np.stack(a) for a in zip(*fits))
  return Probe(np.asarray(l2s, np.float64), mu, sd, kernel, bias)


def carve_validation(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Stratified (train, val) index split of `y`: per class round(fraction · n_c) rows, at least one when the
  class has two or more, never all of them."""
  rng = np.random.default_rng(seed)
  train, val = [], []
  for c in np.unique(y):
    idx = rng.permutation(np.flatnonzero(y == c))
    k = min(len(idx) - 1, max(1 if len(idx) >= 2 else 0, int(round(val_fraction * len(idx)))))
    val.append(idx[:k])
    train.append(idx[k:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _best(val_acc: np.ndarray) -> int:
  """Index of the best validation accuracy; ties go to the larger λ (the grid is ascending)."""
  return int(np.flatnonzero(val_acc == val_acc.max())[-1])


@dataclasses.dataclass
class Selection:
  l2: float
  l2s: np.ndarray
  val_acc: np.ndarray
  train_acc: np.ndarray
  probe: Probe  # the refit on train+val with the chosen λ (one entry)


def select_l2(x: np.ndarray, y: np.ndarray, num_classes: int, *, l2_grid: Sequence[float] = L2_GRID,
              val_fraction: float = 0.2, seed: int = 0, steps: int = STEPS, tol: float = TOL,
              standardize: bool = True, mesh=None) -> Selection:
  """Chooses λ on a validation split carved from (x, y) and refits on all of (x, y). Sees no test data."""
  l2s = np.sort(np.asarray(l2_grid, np.float64))
  tr, va = carve_validation(np.asarray(y), val_fraction, seed)
  if not len(va):
    raise UserError("the linear probe needs at least two training examples of some class to carve a "
                    "validation split")
  kw = dict(steps=steps, tol=tol, standardize=standardize, pad_to=len(x), mesh=mesh)
  probe = fit(x[tr], y[tr], num_classes, l2s, **kw)
  val_acc = np.array([probe.accuracy(x[va], y[va], g) for g in range(len(l2s))])
  train_acc = np.array([probe.accuracy(x[tr], y[tr], g) for g in range(len(l2s))])
  chosen = float(l2s[_best(val_acc)])
  refit = fit(x, y, num_classes, [chosen], **kw)
  return Selection(chosen, l2s, val_acc, train_acc, refit)


def select_on(x: np.ndarray, y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, num_classes: int, *,
              l2_grid: Sequence[float] = L2_GRID, steps: int = STEPS, tol: float = TOL, standardize: bool = True,
              mesh=None) -> Selection:
  """Fits one classifier per λ on (x, y) and chooses λ on the given validation set (val_x, val_y), without a
  refit: the few-shot protocol (a k-shot draw to fit, a disjoint k-shot draw to choose λ; CoOp's linear-probe
  baseline, LP-FT's probe). `Selection.probe` is the fit with the chosen λ (one entry). Sees no test data."""
  l2s = np.sort(np.asarray(l2_grid, np.float64))
  probe = fit(x, y, num_classes, l2s, steps=steps, tol=tol, standardize=standardize, mesh=mesh)
  val_acc = np.array([probe.accuracy(val_x, val_y, g) for g in range(len(l2s))])
  train_acc = np.array([probe.accuracy(x, y, g) for g in range(len(l2s))])
  g = _best(val_acc)
  one = Probe(l2s[g:g + 1], probe.mu[g:g + 1], probe.sd[g:g + 1], probe.kernel[g:g + 1], probe.bias[g:g + 1])
  return Selection(float(l2s[g]), l2s, val_acc, train_acc, one)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 num_classes: int, *, plot_path: str | None = None, **kwargs) -> dict[str, float]:
  """CLIP's linear-probe protocol (module docstring): {'top1', 'top5', 'mean_per_class_recall', 'l2',
  'val_top1'}; `kwargs` go to `select_l2`. The test set is scored once, after λ is fixed."""
  from vlm_jax.evaluate.zeroshot import classification_metrics  # noqa: PLC0415
  sel = select_l2(train_x, train_y, num_classes, **kwargs)
  out = classification_metrics(sel.probe.logits(test_x, 0), test_y, num_classes)
  out.update(l2=sel.l2, val_top1=float(sel.val_acc.max()))
  if plot_path:
    from vlm_jax.evaluate import plots  # noqa: PLC0415
    plots.probe_l2_png(sel.l2s, sel.val_acc, sel.l2, plot_path, train_acc=sel.train_acc,
                       title=f"linear probe (test top-1 {100 * out['top1']:.1f}% at λ = {sel.l2:.2g})")
  return out


def sample_shots(y: np.ndarray, k: int, draws: int, seed: int) -> list[np.ndarray]:
  """`draws` disjoint index sets of k examples per class of `y` (one permutation per class)."""
  rng = np.random.default_rng(seed)
  sets = [[] for _ in range(draws)]
  for c in np.unique(y):
    idx = rng.permutation(np.flatnonzero(y == c))
    if len(idx) < k * draws:
      raise UserError(f"{k}-shot needs {k * draws} training examples of class {int(c)} "
                      f"({k} to fit, {k} to choose λ), it has {len(idx)}")
    for d in range(draws):
      sets[d].append(idx[d * k:(d + 1) * k])
  return [np.sort(np.concatenate(s)) for s in sets]


def few_shot(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
             num_classes: int, *, shots: Sequence[int] = (1, 4), seeds: int = 3,
             l2_grid: Sequence[float] = L2_GRID, steps: int = STEPS, tol: float = TOL,
             standardize: bool = True, mesh=None) -> dict[str, float]:
  """k-shot linear probes (module docstring): {'<k>shot_top1', '<k>shot_top1_std', '<k>shot_l2'} per k."""
  l2s = np.sort(np.asarray(l2_grid, np.float64))
  pad = len(train_x)  # the compiled shape of the full linear probe, for every k
  out = {}
  for k in shots:
    accs, chosen = [], []
    for s in range(seeds):
      fit_idx, val_idx = sample_shots(np.asarray(train_y), int(k), 2, seed=1000 * int(k) + s)
      probe = fit(train_x[fit_idx], train_y[fit_idx], num_classes, l2s, steps=steps, tol=tol,
                  standardize=standardize, pad_to=pad, mesh=mesh)
      g = _best(np.array([probe.accuracy(train_x[val_idx], train_y[val_idx], g) for g in range(len(l2s))]))
      chosen.append(l2s[g])
      accs.append(probe.accuracy(test_x, test_y, g))
    out[f"{k}shot_top1"] = float(np.mean(accs))
    out[f"{k}shot_top1_std"] = float(np.std(accs))
    out[f"{k}shot_l2"] = float(np.exp(np.mean(np.log(chosen))))  # geometric mean of the chosen λ
  return out


# ---- evaluators on the synthetic dataset ------------------------------------------------------------------------

_COMMON = {"batch_size": 256, "image_size": 0, "train_per_class": 16, "l2_grid": L2_GRID, "steps": STEPS,
           "tol": TOL, "standardize": True}


def _features(cfg, extra: dict, kind: str, model, data_config) -> tuple[dict, Callable]:
  from vlm_jax.data import synthetic_eval  # noqa: PLC0415
  from vlm_jax.evaluate import options  # noqa: PLC0415
  from vlm_jax.embedding.batched import Embedder  # noqa: PLC0415
  o = options(cfg, {**_COMMON, **extra}, kind)
  o["image_size"] = int(o["image_size"] or data_config["image_size"])
  enc = Embedder(model, "encode_image", o["batch_size"])

  def features(variables) -> dict:
    sets = synthetic_eval.probe_sets(data_config, image_size=o["image_size"], train_per_class=o["train_per_class"])
    return {"train_x": enc(variables, sets["train"]["image"]), "train_y": sets["train"]["label"],
            "test_x": enc(variables, sets["test"]["image"]), "test_y": sets["test"]["label"],
            "num_classes": len(sets["class_names"])}
  return o, features


def synthetic_evaluator(cfg, *, model, tokenizer, data_config, plot_dir: str | None = None) -> Callable:
  """Builder of kind 'linear_probe_synthetic': CLIP's protocol on frozen image embeddings (encode_image) of
  the synthetic single-object images over all classes. Options: train_per_class (16), l2_grid, val_fraction
  (0.2), steps, tol, standardize, seed, batch_size, image_size, plots."""
  del tokenizer
  o, features = _features(cfg, PROBE_OPTIONS, "linear_probe_synthetic", model, data_config)
  return probe_runner(o, features, plot_dir)


PROBE_OPTIONS = {"val_fraction": 0.2, "seed": 0, "plots": True}


def probe_runner(o: dict, features: Callable, plot_dir: str | None) -> Callable:
  """`run(variables) -> {'linear_probe/<metric>': …}` of an evaluator whose `features(variables)` gives
  train/test features and labels; `o` holds the probe options (PROBE_OPTIONS + l2_grid, steps, tol, …)."""
  plot_path = None
  if plot_dir and o["plots"] and jax.process_index() == 0:
    plot_path = os.path.join(plot_dir, "linear_probe_l2.png")

  def run(variables) -> dict:
    f = features(variables)
    out = linear_probe(f["train_x"], f["train_y"], f["test_x"], f["test_y"], f["num_classes"],
                       plot_path=plot_path, l2_grid=o["l2_grid"], val_fraction=o["val_fraction"], seed=o["seed"],
                       steps=o["steps"], tol=o["tol"], standardize=o["standardize"])
    return {f"linear_probe/{k}": v for k, v in out.items()}
  return run


def fewshot_synthetic_evaluator(cfg, *, model, tokenizer, data_config, plot_dir: str | None = None) -> Callable:
  """Builder of kind 'fewshot_synthetic': k-shot linear probes (shots (1, 4), seeds 3) on the same data as
  'linear_probe_synthetic'. Options: shots, seeds, train_per_class, l2_grid, steps, tol, standardize,
  batch_size, image_size."""
  del tokenizer, plot_dir
  o, features = _features(cfg, {"shots": (1, 4), "seeds": 3}, "fewshot_synthetic", model, data_config)
  if any(2 * int(k) > o["train_per_class"] for k in o["shots"]):
    raise UserError(f"fewshot shots={tuple(o['shots'])} need 2·k ≤ train_per_class={o['train_per_class']} "
                    "(k to fit, k to choose λ)")

  def run(variables) -> dict:
    f = features(variables)
    out = few_shot(f["train_x"], f["train_y"], f["test_x"], f["test_y"], f["num_classes"],
                   shots=tuple(int(k) for k in o["shots"]), seeds=int(o["seeds"]), l2_grid=o["l2_grid"],
                   steps=o["steps"], tol=o["tol"], standardize=o["standardize"])
    return {f"fewshot/{k}": v for k, v in out.items()}
  return run
