"""Entropic optimal transport by Sinkhorn iterations (Cuturi 2013), in the log domain, batched.

For a cost matrix C ∈ R^{M×N} and marginals μ ∈ Δ^M, ν ∈ Δ^N, the entropic OT plan is

  T* = argmin_{T ∈ Π(μ, ν)} <T, C> − λ H(T),   Π(μ, ν) = {T ≥ 0 : T 1_N = μ, Tᵀ 1_M = ν},

  T* = diag(u) K diag(v),  K = exp(−C / λ),  iterating  u ← μ / (K v),  v ← ν / (Kᵀ u)

(Cuturi 2013, "Sinkhorn distances"; PLOT, Chen et al. 2023, Alg. 1). The iterations run on log u, log v with
logsumexp, so small λ (PLOT: 0.1) cannot underflow K. A fixed number of iterations (a `fori_loop`, so the
function jits and differentiates); after the last v-update the column marginals hold exactly and the row
marginals to the convergence reached (`plan_error` reports it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def log_plan(cost: jax.Array, log_mu: jax.Array, log_nu: jax.Array, *, eps: float = 0.1,
             iterations: int = 100) -> jax.Array:
  """log T* [..., M, N] for costs [..., M, N] and log-marginals [..., M], [..., N] (module docstring)."""
  log_k = -cost / eps
  log_mu = jnp.broadcast_to(log_mu, cost.shape[:-1])
  log_nu = jnp.broadcast_to(log_nu, cost.shape[:-2] + cost.shape[-1:])

  def body(_, fg):
    f, g = fg  # log u, log v
    f = log_mu - jax.nn.logsumexp(log_k + g[..., None, :], axis=-1)
    g = log_nu - jax.nn.logsumexp(log_k + f[..., :, None], axis=-2)
    return f, g

  f0 = jnp.zeros(cost.shape[:-1], cost.dtype)
  g0 = jnp.zeros(cost.shape[:-2] + cost.shape[-1:], cost.dtype)
  f, g = jax.lax.fori_loop(0, int(iterations), body, (f0, g0))
  return f[..., :, None] + log_k + g[..., None, :]


def plan(cost: jax.Array, mu: jax.Array | None = None, nu: jax.Array | None = None, *, eps: float = 0.1,
         iterations: int = 100) -> jax.Array:
  """The entropic OT plan T* [..., M, N] (uniform marginals 1/M, 1/N where `mu` / `nu` are None)."""
  m, n = cost.shape[-2:]
  cost = cost.astype(jnp.float32)
  log_mu = jnp.full((m,), -jnp.log(m), jnp.float32) if mu is None else jnp.log(mu.astype(jnp.float32))
  log_nu = jnp.full((n,), -jnp.log(n), jnp.float32) if nu is None else jnp.log(nu.astype(jnp.float32))
  return jnp.exp(log_plan(cost, log_mu, log_nu, eps=eps, iterations=iterations))


def distance(cost: jax.Array, mu: jax.Array | None = None, nu: jax.Array | None = None, *, eps: float = 0.1,
             iterations: int = 100, plan_gradient: bool = False) -> jax.Array:
  """d_OT = <T*, C> [...]; the plan is held constant in the backward unless `plan_gradient` (PLOT computes T*
  without gradient and differentiates the cost only)."""
  t = plan(cost, mu, nu, eps=eps, iterations=iterations)
  if not plan_gradient:
    t = jax.lax.stop_gradient(t)
  return jnp.sum(t * cost, axis=(-2, -1))


def plan_error(t: jax.Array, mu: jax.Array, nu: jax.Array) -> jax.Array:
  """max |T 1 − μ| and |Tᵀ 1 − ν| over everything: how far a plan is from its marginals."""
  return jnp.maximum(jnp.abs(t.sum(-1) - mu).max(), jnp.abs(t.sum(-2) - nu).max())
