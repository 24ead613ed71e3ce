"""Parameter estimation in Gaussian mixtures of experts: convergence rates of the maximum-likelihood estimate
under different gating functions, as in the gating-theory papers of Nhat Ho's group.

    python -m experiments reproduce gaussian_moe [--scale tiny|small|paper] [--seeds N]

Model (d = 1): ``p(y | x) = Σ_k g_k(x) N(y | a_k x + b_k, ν_k)``, with data drawn from a ground truth of
``K* = 2`` experts and the model fitted with ``K`` experts by EM (experts: closed-form weighted least squares;
gate: ``gate_steps`` Gauss-Newton steps on the expected complete log-likelihood per EM iteration, which is
IRLS for the softmax gate as in CRPE-SGaME),
initialised near the truth, for every sample size ``n`` from 1e2 to 1e5, replications vectorised with ``vmap``.
The error is the Voronoi loss of Nguyen, Nguyen & Ho (NeurIPS 2023, "Demystifying Softmax Gating Function in
Gaussian MoE", arXiv 2305.03288 §3; the CRPE-SGaME code): every fitted expert joins the cell of the nearest true
expert (distance ``|Δβ1| + |Δb| + |Δa| + |Δν|``, plus ``|Δτ|`` for temperature gates), a cell with one fitted
expert adds ``m · distance``, a cell with several adds ``m (|Δβ1|^r + |Δb|^r + |Δa|^{r/2} + |Δν|^{r/2})``
(``r = 4`` for two fitted experts, the paper's r̄(2)), and every cell adds ``|Σ m_i − m*_j|``, with the mass
``m = exp(β0)`` (``exp(β0 / τ)`` for temperature gates: the gate's own weight, so two fitted experts that split
a true one, ``β0_i = β0* − τ log 2``, have the true cell mass). The table reports the OLS slope of log(mean
loss) on log n beside the slope the theory predicts.

Gates (the truth of each variant is its own family; ``x ~ U(0, 1)``; the last expert is the reference with
β = 0):

* ``softmax``: ``softmax(β1 x + β0)``, truth of CRPE-SGaME: β0 = (−8, 0), β1 = (25, 0), a = (−20, 20),
  b = (15, −5), ν = (0.09, 0.16). Exact fit: slope −1/2 (Theorem 1); over-fit with K = 3: the r = 4 loss
  also decays at −1/2 (Theorem 2), while a loss with exponent 2 for every parameter, ``loss2``, decays at
  −1/4: two softmax experts fitted to one true expert converge at n^{-1/8} and n^{-1/4}.
* ``laplace``: ``softmax(β0 − 10 |x − β1|)`` (Laplace gating on distances, Nguyen et al. 2024, arXiv 2410.02935;
  the scale 10 is ours, so the gate varies on U(0, 1)); truth β1 = (0.12, 0.52), β0 = (0, 0) (the gate
  switches at x = 0.32, as the softmax truth), same experts. The paper shows Laplace gating removes the
  gate–expert interaction, so over-fitted experts behave like a plain mixture: ``loss2`` at −1/2 (our reading
  of its over-specified rates).
* ``temperature``: the dense-to-sparse gate ``softmax((β1 x + β0) / τ)`` with τ estimated (Nguyen, Akbarian, Ho,
  ICML 2024, arXiv 2401.13875); truth β1 = (2.5, 0), β0 = (−0.8, 0), τ = 0.1 (the softmax truth). The paper
  proves parameter rates slower than any polynomial (down to 1/log n), exact- and over-specified alike:
  predicted slope ≈ 0 for both losses. In this parametrisation only β/τ is identified, the extreme form of that
  interaction.
* ``activation``: the activation dense-to-sparse gate ``softmax((tanh(β1 x) + β0) / τ)`` of the same paper;
  truth β1 = (3, 0), β0 = (−0.5, 0), τ = 0.1. The paper restores polynomial rates: exact fit −1/2; over-fit
  (K = 3), the r = 4 loss −1/2 and ``loss2`` −1/4. The last is our derivation, not a number of the paper: the
  activation removes the gate–expert interactions, but inside an over-fitted cell the Gaussian experts' location
  and variance still interact through the heat equation ``∂²N/∂b² = 2 ∂N/∂ν``, which alone gives two fitted
  Gaussians on one true one the rates n^{-1/8} (b) and n^{-1/4} (ν) (r̄(2) = 4; Ho & Nguyen 2016,
  arXiv 1606.05760), so ``|Δb|²`` decays at n^{-1/4}.

Sigmoid gating is not a variant: its theory (Nguyen, Ho, Rinaldo, NeurIPS 2024, arXiv 2405.13997) is for the
least-squares estimator of a regression function ``Σ sigmoid(β1 x + β0) · expert(x)`` in the over-specified
case, not for the maximum-likelihood estimate of this conditional density, so it predicts no slope for this
table; and in this density model a normalised sigmoid gate is weakly identified (its biases drifted without
bound when we tried it).

Claims: (a) softmax exact fit decays at −1/2; (b) softmax over-fit: the r = 4 loss at −1/2 and ``loss2`` slower;
(c) Laplace over-fit ``loss2`` decays faster than softmax's; (d) exact fit: the activation gate decays at −1/2
while the temperature gate is much slower; (e) the same with over-fitted models (r = 4 loss). A slope "matches"
when within ±0.15 of the prediction; "much slower" is a slope above −1/4.

Scales: ``tiny`` (≤ 20 minutes on 2 CPU cores): 8 sample sizes log-spaced in [1e2, 1e5], 6 replications per
seed, 150 EM iterations of 2 gate Gauss-Newton steps, 2 seeds by default (a seed is an independent batch of
replications, so every claim is judged on two independent estimates of each slope). ``small``: 20 sizes, 40
replications, 400 iterations. ``paper``: CRPE-SGaME's grid (5 sizes in [100, 900] and 195 in [1e3, 1e5]), 40
replications, 2000 iterations.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.tables import common
from experiments.tables.common import Claim, Metric, Table

_LAPLACE_SCALE = 10.0
_MIN_VARIANCE = 1e-4
_MAX_STEP = 0.25  # largest gate step (Euclidean norm): Laplace locations live in [0, 1]
# truth per gate: (β0, β1, τ or None), shared experts (a, b, ν)
TRUTHS = {
    "softmax": ((-8.0, 0.0), (25.0, 0.0), None),
    "laplace": ((0.0, 0.0), (0.12, 0.52), None),
    "temperature": ((-0.8, 0.0), (2.5, 0.0), 0.1),
    "activation": ((-0.5, 0.0), (3.0, 0.0), 0.1),
}
EXPERTS = ((-20.0, 20.0), (15.0, -5.0), (0.09, 0.16))  # a, b, ν


def gate_logits(gate: str, params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  """``(n, K)`` log gate values (up to a per-sample constant) for ``x`` ``(n,)``."""
  b0, b1 = params["beta0"], params["beta1"]
  if gate == "softmax":
    return x[:, None] * b1 + b0
  if gate == "laplace":
    return b0 - _LAPLACE_SCALE * jnp.abs(x[:, None] - b1)
  tau = jnp.exp(params["log_tau"])
  if gate == "temperature":
    return (x[:, None] * b1 + b0) / tau
  return (jnp.tanh(x[:, None] * b1) + b0) / tau


def _log_normal(y, mean, variance):
  return -0.5 * (jnp.log(2 * jnp.pi * variance) + (y - mean) ** 2 / variance)


def _joint(gate, params, x, y):
  """``(n, K)`` log of ``g_k(x) N(y | a_k x + b_k, ν_k)``."""
  log_gate = jax.nn.log_softmax(gate_logits(gate, params, x), axis=-1)
  return log_gate + _log_normal(y[:, None], params["a"] * x[:, None] + params["b"], params["nu"])


def _anchored(gate: str, params: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Which gate parameters are fixed (the reference expert's β where the gate is invariant to shifting them)."""
  last = jnp.arange(params["beta0"].shape[0]) == params["beta0"].shape[0] - 1
  none = jnp.zeros_like(last)
  anchored = {"beta0": last, "beta1": none if gate == "laplace" else last}
  return anchored | ({"log_tau": jnp.zeros((), bool)} if "log_tau" in params else {})


def _chunk_sum(fn, x, y, n, chunk):
  """``Σ_c fn(x_c, y_c)`` over the first ``n`` samples (``n`` traced, a multiple of ``chunk``), in chunks: the
  sample size is an argument, not a shape, so one compilation serves every sample size."""
  def body(c, total):
    xs, ys = (jax.lax.dynamic_slice_in_dim(a, c * chunk, chunk) for a in (x, y))
    return jax.tree.map(jnp.add, total, fn(xs, ys))
  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(fn, x[:chunk], y[:chunk]))
  return jax.lax.fori_loop(0, n // chunk, body, zeros)


def em(gate: str, params: dict[str, jax.Array], x: jax.Array, y: jax.Array, n: jax.Array, *, iterations: int,
       gate_steps: int, chunk: int) -> dict[str, jax.Array]:
  """EM from ``params`` on the first ``n`` samples: closed-form experts; the gate by ``gate_steps`` Gauss-Newton
  steps on the expected complete log-likelihood (IRLS for the softmax gate; a small ridge, steps capped at norm
  ``_MAX_STEP``)."""
  gate_keys = [k for k in ("beta0", "beta1", "log_tau") if k in params]
  _, unravel = jax.flatten_util.ravel_pytree({k: params[k] for k in gate_keys})
  free = ~jax.flatten_util.ravel_pytree(_anchored(gate, params))[0].astype(bool)
  count = n.astype(jnp.float32)

  def iteration(_, old):
    responsibilities = lambda xs, ys: jax.nn.softmax(_joint(gate, old, xs, ys), axis=-1)

    def expert_sums(xs, ys):
      r = responsibilities(xs, ys)
      return [jnp.sum(r * w[:, None], 0) for w in (jnp.ones_like(xs), xs, xs * xs, ys, xs * ys)]

    s0, sx, sxx, sy, sxy = _chunk_sum(expert_sums, x, y, n, chunk)
    det = s0 * sxx - sx ** 2 + 1e-12
    a, b = (s0 * sxy - sx * sy) / det, (sxx * sy - sx * sxy) / det
    residual = lambda xs, ys: jnp.sum(responsibilities(xs, ys) * (ys[:, None] - a * xs[:, None] - b) ** 2, 0)
    nu = _chunk_sum(residual, x, y, n, chunk) / (s0 + 1e-12)

    def gauss_newton(_, v):  # IRLS: exact Newton for the softmax gate, whose logits are linear in β
      def sums(xs, ys):
        logits_fn = lambda v: gate_logits(gate, {**old, **unravel(v)}, xs)
        jac = jax.jacfwd(logits_fn)(v)  # (chunk, K, P)
        g = jax.nn.softmax(logits_fn(v), -1)
        weighted = g[..., None] * jac - g[..., None] * jnp.einsum("nk,nkp->np", g, jac)[:, None, :]
        return (jnp.einsum("nkp,nk->p", jac, responsibilities(xs, ys) - g),
                jnp.einsum("nkp,nkq->pq", jac, weighted))
      grad, fisher = _chunk_sum(sums, x, y, n, chunk)
      grad = jnp.where(free, grad, 0.0) / count
      fisher = jnp.where(free[:, None] & free[None, :], fisher / count, jnp.eye(v.shape[0]))
      ridge = (1e-4 * jnp.trace(fisher) / v.shape[0] + 1e-8) * jnp.eye(v.shape[0])
      step = jnp.linalg.solve(fisher + ridge, grad)
      step = jnp.where(jnp.all(jnp.isfinite(step)), step, 0.0)
      return v + step * jnp.minimum(1.0, _MAX_STEP / (jnp.linalg.norm(step) + 1e-12))

    v = jax.lax.fori_loop(0, gate_steps, gauss_newton,
                          jax.flatten_util.ravel_pytree({k: old[k] for k in gate_keys})[0])
    return {**old, **unravel(v), "a": a, "b": b, "nu": jnp.maximum(nu, _MIN_VARIANCE)}

  return jax.lax.fori_loop(0, iterations, iteration, params)


def truth(gate: str) -> dict[str, jax.Array]:
  (beta0, beta1, tau), (a, b, nu) = TRUTHS[gate], EXPERTS
  params = {"beta0": jnp.array(beta0), "beta1": jnp.array(beta1), "a": jnp.array(a), "b": jnp.array(b),
            "nu": jnp.array(nu)}
  return params if tau is None else {**params, "log_tau": jnp.log(tau)}


def sample(gate: str, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  kx, kz, ke = jax.random.split(key, 3)
  params = truth(gate)
  x = jax.random.uniform(kx, (n,))
  z = jax.random.categorical(kz, gate_logits(gate, params, x), axis=-1)
  y = params["a"][z] * x + params["b"][z] + jnp.sqrt(params["nu"][z]) * jax.random.normal(ke, (n,))
  return x, y


def _tau(params: dict[str, jax.Array]) -> jax.Array:
  """The gate's temperature (1 for gates without one)."""
  return jnp.exp(params["log_tau"]) if "log_tau" in params else jnp.ones(())


def initial(gate: str, key: jax.Array, components: int) -> dict[str, jax.Array]:
  """Near the truth (CRPE-SGaME's ``nearTrue``): each parameter perturbed by 5% noise; an over-fitted model
  splits the first true expert into ``components − 1`` copies sharing its gate mass."""
  params = truth(gate)
  extra = components - 2
  split = {k: (jnp.concatenate([jnp.repeat(v[:1], extra + 1), v[1:]]) if v.ndim else v) for k, v in params.items()}
  split["beta0"] = split["beta0"].at[:extra + 1].add(-_tau(params) * jnp.log(extra + 1.0))
  noise = jax.random.split(key, len(split))
  return {k: v + 0.05 * (jnp.abs(v) + 0.1) * jax.random.normal(nk, v.shape) for (k, v), nk in zip(split.items(), noise)}


def voronoi_loss(gate: str, fitted: dict[str, jax.Array], *, cell_exponent: float) -> jax.Array:
  """The Voronoi loss of the module docstring (``cell_exponent`` r for cells with several fitted experts)."""
  true = truth(gate)
  keys = ("beta1", "b", "a", "nu") + (("log_tau",) if "log_tau" in true else ())
  shape = (fitted["beta0"].shape[0], true["beta0"].shape[0])
  diffs = {k: (jnp.broadcast_to(jnp.abs(jnp.exp(fitted[k]) - jnp.exp(true[k])), shape) if k == "log_tau"
               else jnp.abs(fitted[k][:, None] - true[k][None, :])) for k in keys}  # (fitted, true) each
  distance = sum(diffs.values())
  cell = jnp.argmin(distance, axis=1)
  pick = lambda d: jnp.take_along_axis(d, cell[:, None], 1)[:, 0]
  powered = sum(pick(diffs[k]) ** (cell_exponent if k in ("beta1", "b") else cell_exponent / 2) for k in keys)
  mass = jnp.exp(fitted["beta0"] / _tau(fitted))
  several = jnp.sum(jax.nn.one_hot(cell, shape[1]), axis=0)[cell] > 1
  cell_mass = jax.ops.segment_sum(mass, cell, num_segments=shape[1])
  return jnp.sum(mass * jnp.where(several, powered, pick(distance))) + jnp.sum(
      jnp.abs(cell_mass - jnp.exp(true["beta0"] / _tau(true))))


@functools.partial(jax.jit, static_argnames=("gate", "max_n", "components", "iterations", "gate_steps", "chunk"))
def replicate(key, n, *, gate, max_n, components, iterations, gate_steps, chunk):
  """``(loss with r = 4, loss with exponent 2)`` of one replication fitted to its first ``n`` samples."""
  k_data, k_init = jax.random.split(key)
  x, y = sample(gate, k_data, max_n)
  fitted = em(gate, initial(gate, k_init, components), x, y, n, iterations=iterations, gate_steps=gate_steps,
              chunk=chunk)
  return voronoi_loss(gate, fitted, cell_exponent=4.0), voronoi_loss(gate, fitted, cell_exponent=2.0)


def slope(sizes, losses) -> float:
  """OLS slope of log(loss) on log(n)."""
  return float(np.polyfit(np.log(sizes), np.log(losses), 1)[0])


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any]:
  """The table's runner: every sample size (one compilation), replications vectorised; each replication's
  samples are nested (size n uses the first n of the largest sample)."""
  del workdir
  sizes = [int(n) for n in config.sizes]
  chunk = min(sizes)
  if any(n % chunk for n in sizes):
    raise ValueError(f"sizes: got {sizes}; allowed: multiples of the smallest size")
  keys = jax.random.split(jax.random.PRNGKey(config.seed), config.replications)
  fit = jax.vmap(functools.partial(replicate, gate=config.gate, max_n=max(sizes), components=config.components,
                                   iterations=config.em_iterations, gate_steps=config.gate_steps, chunk=chunk),
                 in_axes=(0, None))
  history, means, means2 = [], [], []
  for n in sizes:
    loss, loss2 = (np.asarray(v) for v in fit(keys, jnp.int32(n)))
    means.append(float(np.mean(loss)))
    means2.append(float(np.mean(loss2)))
    history.append({"step": n, "loss": means[-1], "loss2": means2[-1]})
  return {"metrics": {"slope": slope(sizes, means), "slope2": slope(sizes, means2), "loss_at_max_n": means[-1],
                      "predicted": config.predicted, "predicted2": config.predicted2},
          "history": history}


def base_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "seed": 0, "gate": "softmax", "components": 2, "sizes": [], "replications": 8, "em_iterations": 150,
      "gate_steps": 2, "predicted": -0.5, "predicted2": -0.5})


def _sizes(count: int, low: float = 1e2, high: float = 1e5) -> list[int]:
  """``count`` sizes log-spaced from ``low`` to ``high``, rounded to multiples of ``low``."""
  return [int(round(n / low) * low) for n in np.geomspace(low, high, count)]


def _variant(gate, components, predicted, predicted2):
  return {"gate": gate, "components": components, "predicted": predicted, "predicted2": predicted2}


VARIANTS = {
    "softmax_exact": _variant("softmax", 2, -0.5, -0.5),
    "softmax_overfit": _variant("softmax", 3, -0.5, -0.25),
    "laplace_exact": _variant("laplace", 2, -0.5, -0.5),
    "laplace_overfit": _variant("laplace", 3, -0.5, -0.5),
    "temperature_exact": _variant("temperature", 2, 0.0, 0.0),
    "temperature_overfit": _variant("temperature", 3, 0.0, 0.0),
    "activation_exact": _variant("activation", 2, -0.5, -0.5),
    "activation_overfit": _variant("activation", 3, -0.5, -0.25),
}

SCALES = {
    "micro": {"sizes": [100, 1000], "replications": 2, "em_iterations": 5, "gate_steps": 1},
    "tiny": {"sizes": _sizes(8), "replications": 6, "em_iterations": 150, "gate_steps": 2},
    "small": {"sizes": _sizes(20), "replications": 40, "em_iterations": 400, "gate_steps": 3},
    "paper": {"sizes": [int(n) for n in np.linspace(100, 900, 5)] + [int(round(n, -2)) for n in np.linspace(1e3, 1e5, 195)],
              "replications": 40, "em_iterations": 2000, "gate_steps": 3},
}

METRICS = (
    Metric("slope", "slope (loss)", ".3f"),
    Metric("predicted", "predicted", ".2f"),
    Metric("slope2", "slope (loss2)", ".3f"),
    Metric("predicted2", "predicted (loss2)", ".2f"),
    Metric("loss_at_max_n", "loss at largest n", ".3g"),
)


def _near(m, variant, key="slope", target=None, tolerance=0.15):
  return abs(m[variant][key] - (m[variant]["predicted" if key == "slope" else "predicted2"] if target is None
                                else target)) <= tolerance


CLAIMS = (
    Claim("a", "softmax gating, exact fit: the Voronoi loss decays at n^{-1/2}", ("softmax_exact",),
          lambda m: _near(m, "softmax_exact")),
    Claim("b", "softmax gating, over-fit: the r = 4 loss at n^{-1/2}, the exponent-2 loss slower (about -1/4)",
          ("softmax_overfit",), lambda m: _near(m, "softmax_overfit") and m["softmax_overfit"]["slope2"] > -0.4),
    Claim("c", "Laplace gating, over-fit: the exponent-2 loss decays faster than under softmax gating",
          ("laplace_overfit", "softmax_overfit"),
          lambda m: m["laplace_overfit"]["slope2"] < m["softmax_overfit"]["slope2"] - 0.1),
    Claim("d", "exact fit: the activation dense-to-sparse gate decays at n^{-1/2}; the plain temperature gate far "
          "slower", ("activation_exact", "temperature_exact"),
          lambda m: _near(m, "activation_exact") and m["temperature_exact"]["slope"] > -0.25),
    Claim("e", "over-fit: the activation gate's r = 4 loss decays at n^{-1/2}; the plain temperature gate's far "
          "slower", ("activation_overfit", "temperature_overfit"),
          lambda m: _near(m, "activation_overfit") and m["temperature_overfit"]["slope"] > -0.25),
)


def loglog_plot(out_dir: pathlib.Path) -> str:
  """``loglog.png``: mean loss against n per variant with the fitted lines; returns a markdown note."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  runs = common.read_runs(out_dir)
  fig, ax = plt.subplots(figsize=(7, 5))
  for run in runs:
    n = np.array([h["step"] for h in run["history"]], float)
    loss = np.array([h["loss"] for h in run["history"]])
    fit = np.polyfit(np.log(n), np.log(loss), 1)
    line = ax.loglog(n, loss, "o", ms=3)[0]
    ax.loglog(n, np.exp(np.polyval(fit, np.log(n))), color=line.get_color(),
              label=f"{run['variant']} (seed {run['seed']}): {np.exp(fit[1]):.2g}·n^{fit[0]:.2f}")
  ax.set(xlabel="sample size n", ylabel="mean Voronoi loss", title="Gaussian MoE: parameter estimation")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out_dir / "loglog.png", dpi=120)
  plt.close(fig)
  return "Log-log plot of the loss against n with the fitted lines: `loglog.png`.\n"


TABLE = Table(
    name="gaussian_moe",
    paper=("Gaussian-MoE parameter estimation under softmax (arXiv 2305.03288), Laplace (arXiv 2410.02935) and "
           "dense-to-sparse temperature / activation gates (arXiv 2401.13875): convergence rates of the Voronoi "
           "loss"),
    variants=VARIANTS,
    scales=SCALES,
    metrics=METRICS,
    paper_columns=("rate",),
    paper_numbers={v: {"rate": VARIANTS[v]["predicted"]} for v in VARIANTS},
    claims=CLAIMS,
    base_config=base_config,
    default_seeds=2,
    micro_variants=("softmax_overfit",),
    summary=loglog_plot,
    runner=run,
    plot_metric="slope",
    curve_key="loss",
)
