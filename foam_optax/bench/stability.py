"""`foam-bench --suite stability`: where a stale preconditioner destabilises
training, and whether FOAM's damping prevents it at equal cost.

A stale inverse root ``X = Q diag((D + ε)^(-1/p)) Qᵀ`` amplifies the
gradient along directions where the factor had no energy when ``Q, D``
were computed by up to ``ε^(-1/p)``. When the data moves into such
directions before the next refresh, the step blows up. Workloads:

* ``switch_regression``: linear regression ``x ↦ x W`` (W 32 × 16) whose
  inputs lie in a 16-dimensional subspace (eigenvalues log-spaced over
  1..1e-2) and switch, at a step drawn per seed from `switch_window`, to the
  orthogonal subspace: the input-side factor's null space then carries the
  whole gradient. Loss: the exact expected squared error on the current
  inputs' distribution.
* ``switch_mlp``: an MLP 128 → 64 → 64 → 10 (GELU, no biases) on
  scikit-learn's digits whose 64 pixels arrive on input channels 0–63 and,
  after the switch, on channels 64–127. Loss: cross-entropy on a fixed set of
  256 digits in the current layout.
* ``stationary_regression`` and ``digits_mlp``: the same without a switch
  (controls).

Each workload runs in settings (grafting, exponent p, ε0), every method over
a learning-rate grid × seeds. A run *diverges* when its loss is ever
non-finite or above 10 × its initial loss. Its *largest spike* is the largest
rise of the loss above its running minimum within a data phase, as a fraction
of the loss at the phase's start (runs that diverged have none). Final loss
(slowness) is reported separately.

Methods, per setting (ε0 the setting's unless stated):

* ``foam``: the paper's FOAM (f = 20, τ = 0.75, ε_max = 3e-7);
* ``shampoo_f{f}``: Shampoo at f ∈ `LADDER`;
* ``shampoo_equal_evd``: Shampoo at equal EVD budget: the largest f whose
  scheduled EVD count is at least FOAM's mean measured count on that
  workload and setting (Shampoo never gets fewer EVDs than FOAM);
* the FOAM paper's figure-1 design (official ``vit_figure1.yaml``), in the
  settings with ε0 = 1e-9: Shampoo f = 30 (first check at 30) at ε0 ∈
  {1e-9, 1e-8} against FOAM (f = 20, ε0 = 1e-9) over τ ∈ {0.25, 0.5, 0.75}
  × ε_max ∈ {1, 3, 5}e-7;
* policy candidates (`POLICY`): other ε_max at the paper's τ, checking more
  often, sketched checks, and ``controller='foam_hold'`` (registered here:
  FOAM's damping never decreases until the next refresh).

The whole run of a method is one jitted `lax.scan`; its hyperparameters are
traced arguments, so one compilation per (workload family, controller,
proxy, grafting, p) serves every method, learning rate and seed.
"""

from __future__ import annotations

import dataclasses
import pathlib
import typing
from typing import Any, Callable, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import foam_optax as fo
from foam_optax import controllers
from foam_optax.bench import harness, measure, report

BLOCK = harness.Block(
    "### Stability under a data switch (`foam-bench --suite stability`)",
    "<!-- bench-stability:start -->", "<!-- bench-stability:end -->")
DIVERGENCE_FACTOR = 10.0
LADDER = (1, 5, 20, 100, 500)
START = 20                  # first check of every method but figure 1's Shampoo
PAPER: dict[str, Any] = dict(check_frequency=20, threshold=0.75,
                             max_epsilon=3e-7)
FIGURE1_SHAMPOO_START = 30
FIGURE1_SHAMPOO_EPSILONS = (1e-9, 1e-8)
FIGURE1_TAUS = (0.25, 0.5, 0.75)
FIGURE1_MAX_EPSILONS = (1e-7, 3e-7, 5e-7)
FIGURE1_EPSILON = 1e-9


@controllers.register("foam_hold", uses_key=True)
def foam_hold(factor, basis, eigvals, damping, cfg, key):
  """FOAM whose damping never decreases between refreshes: the proposal is
  ``max(ε_c, ε_c · h / τ)`` instead of ``max(ε0, ε_c · h / τ)``."""
  decision = controllers.foam(factor, basis, eigvals, damping, cfg, key)
  current = jnp.maximum(jnp.asarray(cfg.epsilon, damping.dtype), damping)
  return decision._replace(damping=jnp.maximum(decision.damping, current))


# ---------------------------------------------------------------- workloads


@dataclasses.dataclass(frozen=True)
class Family:
  """Workloads that share a model and loss (and their compilations).

  Attributes:
    name: identifier.
    init_params: seed -> parameters.
    stream: (seed, steps, switch_step or None) -> (per-step pytree with a
      leading step axis and an int32 ``phase``, per-run constants).
    loss_fn: (params, one step's data, constants) -> minibatch loss.
    eval_loss: (params, phase, constants) -> the loss of the phase's data.
  """

  name: str
  init_params: Callable[[int], Any]
  stream: Callable[[int, int, Optional[int]], tuple]
  loss_fn: Callable[..., jax.Array]
  eval_loss: Callable[..., jax.Array]


def _phases(steps: int, switch_step: Optional[int]) -> np.ndarray:
  """Per step: 0 before the switch (or always), 1 from step `switch_step`."""
  step = np.arange(1, steps + 1)
  if switch_step is None:
    return np.zeros(steps, np.int32)
  return (step >= switch_step).astype(np.int32)


def regression_family(inputs: int = 32, outputs: int = 16,
                      batch_size: int = 32, noise: float = 0.01) -> Family:
  """Regression whose inputs switch from a subspace to its complement."""
  rank = inputs // 2

  def stream(seed, steps, switch_step):
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((inputs, inputs)))
    spectrum = np.logspace(0.0, -2.0, rank)
    subspaces = np.stack([basis[:, :rank], basis[:, rank:]])
    target = rng.standard_normal((inputs, outputs)) / np.sqrt(rank)
    phase = _phases(steps, switch_step)
    latent = rng.standard_normal((steps, batch_size, rank)) * np.sqrt(spectrum)
    x = np.einsum("tbk,tdk->tbd", latent, subspaces[phase])
    y = x @ target + noise * rng.standard_normal((steps, batch_size, outputs))
    covariances = np.einsum("pdk,k,pek->pde", subspaces, spectrum, subspaces)
    data = {"x": x, "y": y, "phase": phase}
    constants = {"covariances": covariances, "target": target}
    as_jax = lambda tree: jax.tree.map(
        lambda a: jnp.asarray(a, jnp.int32 if a.dtype == np.int32
                              else jnp.float32), tree)
    return as_jax(data), as_jax(constants)

  def loss_fn(params, batch, constants):
    del constants
    error = batch["x"] @ params["w"] - batch["y"]
    return 0.5 * jnp.mean(jnp.sum(error * error, axis=-1)) / outputs

  def eval_loss(params, phase, constants):
    delta = params["w"] - constants["target"]
    covariance = constants["covariances"][phase]
    return 0.5 * jnp.sum(delta * (covariance @ delta)) / outputs

  return Family("regression",
                lambda seed: {"w": jnp.zeros((inputs, outputs), jnp.float32)},
                stream, loss_fn, eval_loss)


def mlp_family(hidden: int = 64, batch_size: int = 64,
               eval_size: int = 256) -> Family:
  """Digits MLP whose pixels move to a second set of input channels."""
  from sklearn.datasets import load_digits
  pixels, labels = load_digits(return_X_y=True)
  pixels = jnp.asarray(pixels / 16.0, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  width = pixels.shape[1]
  held = jnp.asarray(np.random.default_rng(0).permutation(len(labels))[
      :eval_size])
  sizes = [(2 * width, hidden), (hidden, hidden), (hidden, 10)]

  def init_params(seed):
    keys = jax.random.split(jax.random.key(seed), len(sizes))
    return {f"w{i}": jax.random.normal(k, s) / np.sqrt(s[0])
            for i, (k, s) in enumerate(zip(keys, sizes))}

  def stream(seed, steps, switch_step):
    index = np.random.default_rng(seed).integers(
        0, len(labels), (steps, batch_size))
    data = {"index": jnp.asarray(index, jnp.int32),
            "phase": jnp.asarray(_phases(steps, switch_step))}
    return data, {}

  def inputs(index, phase):
    x = pixels[index]
    zeros = jnp.zeros_like(x)
    return jnp.where(phase == 1, jnp.concatenate([zeros, x], -1),
                     jnp.concatenate([x, zeros], -1))

  def cross_entropy(params, x, y):
    h = jax.nn.gelu(x @ params["w0"])
    h = jax.nn.gelu(h @ params["w1"])
    logp = jax.nn.log_softmax(h @ params["w2"])
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))

  def loss_fn(params, batch, constants):
    del constants
    return cross_entropy(params, inputs(batch["index"], batch["phase"]),
                         labels[batch["index"]])

  def eval_loss(params, phase, constants):
    del constants
    return cross_entropy(params, inputs(held, phase), labels[held])

  return Family("mlp", init_params, stream, loss_fn, eval_loss)


@dataclasses.dataclass(frozen=True)
class Setting:
  """Optimizer setting shared by every method of a workload's runs."""

  name: str
  grafting: str
  exponent: int
  epsilon: float
  lrs: tuple

  @property
  def figure1(self) -> bool:
    """The figure-1 design runs where ε0 is the paper's."""
    return self.epsilon == FIGURE1_EPSILON


@dataclasses.dataclass(frozen=True)
class Workload:
  name: str
  description: str
  family: str        # key of `StabilityConfig.families`
  switches: bool
  settings: tuple


REGRESSION_SETTINGS = tuple(
    Setting(f"{graft}_p4_eps{eps:g}", "none" if graft == "no_graft" else
            "adam", 4, eps, (1e-2, 3e-2, 1e-1))
    for graft in ("no_graft", "adam_graft") for eps in (1e-12, 1e-9))
MLP_SETTINGS = (
    Setting("no_graft_p4_eps1e-09", "none", 4, 1e-9, (3e-3, 1e-2, 3e-2)),
    # The FOAM paper's setting.
    Setting("adam_graft_p2_eps1e-09", "adam", 2, 1e-9, (3e-3, 1e-2, 3e-2)))


def default_workloads(settings_regression=REGRESSION_SETTINGS,
                      settings_mlp=MLP_SETTINGS) -> tuple:
  return (
      Workload("switch_regression", "linear regression 32 -> 16, inputs "
               "switch to the orthogonal 16-dim subspace", "regression",
               True, settings_regression),
      Workload("stationary_regression", "the same regression, no switch "
               "(control)", "regression", False, settings_regression),
      Workload("switch_mlp", "MLP 128-64-64-10 on digits, pixels move to "
               "input channels 64-127", "mlp", True, settings_mlp),
      Workload("digits_mlp", "the same MLP, no switch (control)", "mlp",
               False, settings_mlp))


# ------------------------------------------------------------------ methods


@dataclasses.dataclass(frozen=True)
class Method:
  """An optimizer configuration; None fields take the setting's value."""

  name: str
  group: str                  # foam, ladder, equal, figure1 or policy
  controller: str = "foam"    # 'stale' is Shampoo
  proxy: Literal["exact", "sketch"] = "exact"
  check_frequency: int = 20
  threshold: float = 0.75
  max_epsilon: float = 3e-7
  epsilon: Optional[float] = None
  start: int = START

  def hyperparameters(self, setting: Setting) -> dict:
    eps = setting.epsilon if self.epsilon is None else self.epsilon
    return {"check_frequency": self.check_frequency, "epsilon": eps,
            "threshold": self.threshold,
            # Shampoo's damping after a failed refresh (SPEC 2.1's alias).
            "max_epsilon": (max(3e-7, eps) if self.controller == "stale"
                            else self.max_epsilon),
            "start_preconditioning_step": self.start}


def shampoo(name, group, check_frequency, **kwargs) -> Method:
  return Method(name, group, controller="stale",
                check_frequency=check_frequency, **kwargs)


FOAM = Method("foam", "foam", **PAPER)
POLICY = (
    Method("policy_eps_max1e-7", "policy", max_epsilon=1e-7),
    Method("policy_eps_max5e-7", "policy", max_epsilon=5e-7),
    # The setting an earlier study found stable on this switch.
    Method("policy_tau0.25_eps_max1e-7", "policy", threshold=0.25,
           max_epsilon=1e-7),
    Method("policy_hold", "policy", controller="foam_hold"),
    Method("policy_f5", "policy", check_frequency=5),
    Method("policy_f1", "policy", check_frequency=1),
    Method("policy_f1_sketch", "policy", check_frequency=1, proxy="sketch"),
)


def figure1_methods() -> list:
  methods = [shampoo(f"fig1_shampoo_f30_eps{eps:g}", "figure1", 30,
                     epsilon=eps, start=FIGURE1_SHAMPOO_START)
             for eps in FIGURE1_SHAMPOO_EPSILONS]
  methods += [Method(f"fig1_foam_tau{tau:g}_eps_max{cap:g}", "figure1",
                     threshold=tau, max_epsilon=cap, epsilon=FIGURE1_EPSILON)
              for tau in FIGURE1_TAUS for cap in FIGURE1_MAX_EPSILONS]
  return methods


def scheduled_evds(check_frequency: int, steps: int, start: int,
                   num_factors: int) -> int:
  """EVDs of Shampoo at f over `steps`: every factor at `start` and at every
  later multiple of f."""
  later = steps // check_frequency - start // check_frequency
  return num_factors * (1 + later)


def equal_budget_frequency(foam_evds: float, steps: int,
                           num_factors: int) -> int:
  """The largest f whose scheduled EVDs are at least `foam_evds`."""
  return max(f for f in range(1, steps + 1)
             if scheduled_evds(f, steps, START, num_factors) >= foam_evds)


# --------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class StabilityConfig:
  """Sizes of the suite (`FULL`) or of its smoke run (`QUICK`).

  Attributes:
    steps: training steps of every run.
    switch_window: [low, high): the switch step of seed s is drawn
      uniformly from it (`switch_step`), so Shampoo's check schedule meets
      the switch at every phase.
    seeds: seeds per learning rate.
    workloads: the `Workload`s.
    ladder: Shampoo's fixed check frequencies.
    policy: the policy candidates.
    curve_every: the stored loss curves keep every this many steps.
    fast_compile: compile with `measure.fast_compile()` (a smoke run's
      timings mean nothing).
  """

  steps: int
  switch_window: tuple
  seeds: int
  workloads: tuple
  ladder: tuple = LADDER
  policy: tuple = POLICY
  curve_every: int = 5
  fast_compile: bool = False


FULL = StabilityConfig(steps=600, switch_window=(250, 350), seeds=3,
                       workloads=default_workloads())
QUICK = StabilityConfig(
    steps=80, switch_window=(40, 60), seeds=2,
    workloads=default_workloads(
        (Setting("no_graft_p4_eps1e-09", "none", 4, 1e-9, (3e-2,)),), ())[:2],
    ladder=(1, 20), curve_every=4,
    policy=tuple(m for m in POLICY if m.name in ("policy_hold", "policy_f1")),
    fast_compile=True)


def switch_step(seed: int, window: tuple) -> int:
  return int(np.random.default_rng(10_000 + seed).integers(*window))


def families() -> dict:
  return {"regression": regression_family, "mlp": mlp_family}


class Simulator:
  """One jitted whole-run function per (controller, proxy, grafting, p);
  `compiler_options` go to XLA."""

  def __init__(self, family: Family, steps: int, curve_every: int,
               compiler_options: Optional[dict] = None):
    self.family, self.steps, self.curve_every = family, steps, curve_every
    self._compiler_options = compiler_options
    self._cache = {}

  def _build(self, method: Method, setting: Setting):
    family = self.family

    def simulate(hp, lr, params, data, constants):
      common: dict[str, Any] = dict(
          b1=0.95, b2=0.995, exponent=setting.exponent,
          grafting=setting.grafting, epsilon=hp["epsilon"],
          check_frequency=hp["check_frequency"],
          start_preconditioning_step=hp["start_preconditioning_step"])
      if method.controller == "stale":
        tx = fo.shampoo(learning_rate=lr, **common)
      else:
        # A name registered here (foam_hold) is outside the signature's
        # Literal of the built-in controllers.
        controller = typing.cast(Any, method.controller)
        tx = fo.foam(learning_rate=lr, controller=controller,
                     proxy=method.proxy, threshold=hp["threshold"],
                     max_epsilon=hp["max_epsilon"], **common)

      def step(carry, batch):
        params, state = carry
        # The loss of the step's data distribution before the update.
        loss = family.eval_loss(params, batch["phase"], constants)
        grads = jax.grad(family.loss_fn)(params, batch, constants)
        updates, state = tx.update(grads, state, params)
        stats = fo.stats(state)
        return ((optax.apply_updates(params, updates), state),
                (loss, stats["damping_mean"]))

      (params, state), (losses, damping) = jax.lax.scan(
          step, (params, tx.init(params)), data)
      final = family.eval_loss(params, data["phase"][-1], constants)
      stats = fo.stats(state)
      return {"losses": jnp.append(losses, final), "damping": damping,
              "eigendecompositions": stats["eigendecompositions"],
              "checks": stats["checks"], "num_factors": stats["num_factors"]}

    return jax.jit(simulate, compiler_options=self._compiler_options)

  def run(self, method: Method, setting: Setting, lr: float, seed: int,
          switch: Optional[int]) -> dict:
    key = (method.controller, method.proxy, setting.grafting, setting.exponent)
    if key not in self._cache:
      self._cache[key] = self._build(method, setting)
    hp = {k: jnp.asarray(v, jnp.int32 if isinstance(v, int) else jnp.float32)
          for k, v in method.hyperparameters(setting).items()}
    data, constants = self.family.stream(seed, self.steps, switch)
    out = jax.device_get(self._cache[key](
        hp, jnp.float32(lr), self.family.init_params(seed), data, constants))
    return outcome(np.asarray(out["losses"], np.float64),
                   np.asarray(data["phase"]), out, lr, seed, switch,
                   self.curve_every)


def outcome(losses, phase, out, lr, seed, switch, curve_every) -> dict:
  """A run's record: divergence, largest spike, final loss, EVDs and the
  loss curve (`losses`: before each step, then after the last)."""
  initial = losses[0]
  bad = ~np.isfinite(losses) | (losses > DIVERGENCE_FACTOR * initial)
  diverged = bool(bad.any())
  return {"lr": lr, "seed": seed, "switch_step": switch,
          "initial_loss": float(initial), "final_loss": float(losses[-1]),
          "diverged": diverged,
          "diverged_at": int(np.argmax(bad)) + 1 if diverged else None,
          "spike": None if diverged else largest_spike(losses, phase),
          "eigendecompositions": int(out["eigendecompositions"]),
          "checks": int(out["checks"]),
          "num_factors": int(out["num_factors"]),
          "damping_mean_over_steps": float(np.mean(out["damping"])),
          "curve": [float(x) for x in losses[::curve_every]]}


def largest_spike(losses: np.ndarray, phase: np.ndarray) -> float:
  """Largest rise above the running minimum within a phase, as a fraction
  of the loss at the phase's start (`losses` has one more entry than
  `phase`: the last belongs to the last phase)."""
  phase = np.append(phase, phase[-1])
  spike = 0.0
  for p in np.unique(phase):
    segment = losses[phase == p]
    rise = segment - np.minimum.accumulate(segment)
    spike = max(spike, float(rise.max() / segment[0]))
  return spike


def summarize(runs: list) -> dict:
  """Divergences, spikes, final losses and EVDs of a method's runs."""
  calm = [r for r in runs if not r["diverged"]]
  spikes = [r["spike"] for r in calm]
  finals = [r["final_loss"] for r in calm]
  return {
      "runs": len(runs), "divergences": sum(r["diverged"] for r in runs),
      "divergences_per_lr": {str(lr): sum(r["diverged"] for r in runs
                                          if r["lr"] == lr)
                             for lr in sorted({r["lr"] for r in runs})},
      "spike_max": max(spikes) if spikes else None,
      "spike_median": float(np.median(spikes)) if spikes else None,
      "final_loss_median": float(np.median(finals)) if finals else None,
      "eigendecompositions": float(np.mean([r["eigendecompositions"]
                                            for r in runs])),
      "checks": float(np.mean([r["checks"] for r in runs])),
      "damping_mean_over_steps": float(np.mean(
          [r["damping_mean_over_steps"] for r in runs]))}


def units_of_work(cfg: StabilityConfig) -> int:
  """Runs the suite does (progress-bar units)."""
  total = 0
  for w in cfg.workloads:
    for s in w.settings:
      methods = 2 + len(cfg.ladder) + len(cfg.policy)
      methods += len(figure1_methods()) if s.figure1 else 0
      total += methods * len(s.lrs) * cfg.seeds
  return total


def run(cfg: StabilityConfig, context: harness.Context) -> dict:
  """Runs every workload, setting and method; returns the results with the
  policy study and the targets."""
  options = measure.compiler_options(cfg.fast_compile)
  simulators = {name: Simulator(make(), cfg.steps, cfg.curve_every, options)
                for name, make in families().items()
                if any(w.family == name for w in cfg.workloads)}
  result = {"config": {"steps": cfg.steps, "switch_window": cfg.switch_window,
                       "seeds": cfg.seeds, "ladder": cfg.ladder,
                       "curve_every": cfg.curve_every,
                       "divergence_factor": DIVERGENCE_FACTOR},
            "workloads": {}}
  for w in cfg.workloads:
    sim = simulators[w.family]
    record = {"description": w.description, "switches": w.switches,
              "settings": {}}
    for s in w.settings:

      def evaluate(method):
        runs = []
        for lr in s.lrs:
          for seed in range(cfg.seeds):
            switch = switch_step(seed, cfg.switch_window) if w.switches else None
            runs.append(sim.run(method, s, lr, seed, switch))
            context.progress(1)
        return {"group": method.group, "controller": method.controller,
                "proxy": method.proxy,
                "hyperparameters": method.hyperparameters(s),
                "runs": runs, "summary": summarize(runs)}

      methods = {"foam": evaluate(FOAM)}
      for f in cfg.ladder:
        methods[f"shampoo_f{f}"] = evaluate(shampoo(f"shampoo_f{f}", "ladder",
                                                    f))
      foam_summary = methods["foam"]["summary"]
      num_factors = methods["foam"]["runs"][0]["num_factors"]
      equal_f = equal_budget_frequency(foam_summary["eigendecompositions"],
                                       cfg.steps, num_factors)
      methods["shampoo_equal_evd"] = evaluate(
          shampoo("shampoo_equal_evd", "equal", equal_f))
      if s.figure1:
        for method in figure1_methods():
          methods[method.name] = evaluate(method)
      for method in cfg.policy:
        methods[method.name] = evaluate(method)
      record["settings"][s.name] = {
          **dataclasses.asdict(s), "equal_evd_frequency": equal_f,
          "scheduled_equal_evds": scheduled_evds(equal_f, cfg.steps, START,
                                                 num_factors),
          "methods": methods}
    result["workloads"][w.name] = record
  result["policy"] = policy_study(result, cfg)
  result["targets"] = targets(result)
  return result


# -------------------------------------------------------- policy and targets


def _cells(result: dict, switches: bool):
  for w, record in result["workloads"].items():
    if record["switches"] == switches:
      for s, setting in record["settings"].items():
        yield w, s, setting["methods"]


def _paired_ratio(runs: list, reference: list) -> Optional[float]:
  """Median final-loss ratio over the runs (same lr and seed) where
  neither diverged."""
  ratios = [a["final_loss"] / b["final_loss"] for a, b in zip(runs, reference)
            if not (a["diverged"] or b["diverged"]) and b["final_loss"] > 0]
  return float(np.median(ratios)) if ratios else None


def policy_study(result: dict, cfg: StabilityConfig) -> dict:
  """The paper's FOAM and each candidate: divergences and EVDs summed over
  the switch workloads, and on the controls divergences, EVDs and the median
  paired final-loss ratio against the paper's FOAM."""
  study = {}
  switch = list(_cells(result, True))
  control = list(_cells(result, False))
  for name in ["foam"] + [m.name for m in cfg.policy]:
    ratios = [_paired_ratio(m[name]["runs"], m["foam"]["runs"])
              for _, _, m in control]
    ratios = [r for r in ratios if r is not None]
    study[name] = {
        "switch_divergences": sum(m[name]["summary"]["divergences"]
                                  for _, _, m in switch),
        "switch_runs": sum(m[name]["summary"]["runs"] for _, _, m in switch),
        "switch_divergences_per_setting": {
            f"{w}/{s}": m[name]["summary"]["divergences"]
            for w, s, m in switch},
        "switch_eigendecompositions_per_setting": {
            f"{w}/{s}": m[name]["summary"]["eigendecompositions"]
            for w, s, m in switch},
        "switch_checks_per_setting": {
            f"{w}/{s}": m[name]["summary"]["checks"] for w, s, m in switch},
        "control_divergences": sum(m[name]["summary"]["divergences"]
                                   for _, _, m in control),
        "control_eigendecompositions_per_setting": {
            f"{w}/{s}": m[name]["summary"]["eigendecompositions"]
            for w, s, m in control},
        "control_loss_ratio_median": (float(np.median(ratios)) if ratios
                                      else None),
        "control_loss_ratio_max": max(ratios) if ratios else None}
  return study


CONTROL_LOSS_TOLERANCE = 1.10


def targets(result: dict) -> dict:
  """FOAM against Shampoo at equal EVD budget (switch: divergences;
  controls: divergences and final loss), and the figure-1 design."""
  out = {}
  for w, s, m in _cells(result, True):
    foam, equal = m["foam"]["summary"], m["shampoo_equal_evd"]["summary"]
    f = m["shampoo_equal_evd"]["hyperparameters"]["check_frequency"]
    out[f"equal_budget_{w}_{s}"] = {
        "target": f"{w}, {s}: FOAM diverges no more often than Shampoo at "
                  "equal EVD budget",
        "measured": (f"FOAM {foam['divergences']}/{foam['runs']} "
                     f"({foam['eigendecompositions']:.1f} EVDs); Shampoo "
                     f"f={f} {equal['divergences']}/{equal['runs']} "
                     f"({equal['eigendecompositions']:.1f} EVDs)"),
        "met": foam["divergences"] <= equal["divergences"]}
  for w, s, m in _cells(result, False):
    foam, equal = m["foam"]["summary"], m["shampoo_equal_evd"]["summary"]
    f = m["shampoo_equal_evd"]["hyperparameters"]["check_frequency"]
    ratio = _paired_ratio(m["foam"]["runs"], m["shampoo_equal_evd"]["runs"])
    out[f"control_{w}_{s}"] = {
        "target": f"{w} (control), {s}: FOAM diverges no more often than "
                  "Shampoo at equal EVD budget, median final loss ≤ "
                  f"{CONTROL_LOSS_TOLERANCE:g}× its",
        "measured": (f"FOAM {foam['divergences']}/{foam['runs']}, Shampoo "
                     f"f={f} {equal['divergences']}/{equal['runs']}; loss "
                     f"ratio {report.fmt(ratio, '.3f')}"),
        "met": (foam["divergences"] <= equal["divergences"]
                and ratio is not None and ratio <= CONTROL_LOSS_TOLERANCE)}
  for w, s, m in _cells(result, True):
    foam_cells = {n: v["summary"] for n, v in m.items()
                  if n.startswith("fig1_foam")}
    if not foam_cells:
      continue
    stale = {n: v["summary"] for n, v in m.items()
             if n.startswith("fig1_shampoo")}
    worst = max(c["divergences"] for c in foam_cells.values())
    best = min(c["divergences"] for c in stale.values())
    out[f"figure1_{w}_{s}"] = {
        "target": f"{w}, {s}, figure-1 design: every FOAM (τ, ε_max) "
                  "diverges no more often than Shampoo f=30 at its better ε0",
        "measured": (f"FOAM worst cell {worst}/"
                     f"{next(iter(foam_cells.values()))['runs']}; Shampoo "
                     f"f=30 " + ", ".join(
                         f"ε0 {n.split('_eps')[1]}: {c['divergences']}"
                         for n, c in stale.items())),
        "met": worst <= best}
  return out


# ------------------------------------------------------------------ report


def markdown(result: dict) -> str:
  """Per workload and setting: the main methods; the figure-1 grid; the
  policy study; the targets."""
  cfg = result["config"]
  lines = [f"{cfg['steps']} steps per run; every method over its setting's "
           f"learning rates × {cfg['seeds']} seeds; switch step per seed in "
           f"[{cfg['switch_window'][0]}, {cfg['switch_window'][1]}). Diverged: "
           f"loss non-finite or above {cfg['divergence_factor']:g}× the "
           "initial loss. Spike: largest rise above the running minimum "
           "within a data phase, as a fraction of the loss at the phase's "
           "start (runs that did not diverge). EVDs: mean over runs.", ""]
  for w, record in result["workloads"].items():
    lines += [f"#### {w}: {record['description']}", ""]
    for s, setting in record["settings"].items():
      lines += [f"{s} (lr ∈ {{{', '.join(f'{x:g}' for x in setting['lrs'])}}}"
                f"; equal EVD budget: Shampoo f = "
                f"{setting['equal_evd_frequency']}, "
                f"{setting['scheduled_equal_evds']} EVDs scheduled)", "",
                "| method | EVDs | diverged | per lr | largest spike "
                "| median spike | median final loss |",
                "|---|---|---|---|---|---|---|"]
      for name, m in setting["methods"].items():
        if m["group"] not in ("foam", "ladder", "equal"):
          continue
        lines.append(_method_row(name, m))
      lines.append("")
  lines += _figure1_lines(result) + _policy_lines(result)
  lines += ["#### Targets", "", report.targets_table(result["targets"])]
  return "\n".join(lines)


def _method_row(name: str, m: dict) -> str:
  s = m["summary"]
  label = name
  if m["group"] == "equal":
    label += f" (f={m['hyperparameters']['check_frequency']})"
  return (f"| {label} | {s['eigendecompositions']:.1f} | "
          f"{s['divergences']}/{s['runs']} | "
          f"{' / '.join(str(v) for v in s['divergences_per_lr'].values())} | "
          f"{report.fmt(s['spike_max'])} | {report.fmt(s['spike_median'])} | "
          f"{report.fmt(s['final_loss_median'])} |")


def _figure1_lines(result: dict) -> list:
  columns = [(w, s, setting["methods"])
             for w, record in result["workloads"].items()
             for s, setting in record["settings"].items()
             if "fig1_shampoo_f30_eps1e-09" in setting["methods"]]
  if not columns:
    return []
  names = [n for n, m in columns[0][2].items() if m["group"] == "figure1"]
  lines = ["#### The paper's figure-1 design", "",
           "Shampoo f = 30 (first check at 30) at two ε0 against FOAM "
           "(f = 20, ε0 = 1e-9) over τ × ε_max; each cell: diverged runs / "
           "runs, mean EVDs.", "",
           "| method | " + " | ".join(f"{w} {s}" for w, s, _ in columns) + " |",
           "|---" * (len(columns) + 1) + "|"]
  for name in names:
    cells = []
    for _, _, methods in columns:
      s = methods[name]["summary"]
      cells.append(f"{s['divergences']}/{s['runs']}, "
                   f"{s['eigendecompositions']:.0f}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return lines + [""]


def _policy_lines(result: dict) -> list:
  study = result["policy"]
  settings = list(next(iter(study.values()))["switch_divergences_per_setting"])
  lines = ["#### Policy study (this library's finding, not the paper's)", "",
           "FOAM's paper configuration and candidates, each at every "
           "setting's ε0: diverged runs on each switch workload and setting "
           "(with mean EVDs and checks), and on the controls the diverged "
           "runs and the median (max over settings) of the paired final-loss "
           "ratio against the paper's FOAM.", "",
           "| candidate | " + " | ".join(settings)
           + " | controls: diverged | controls: mean EVDs "
             "| controls: loss ratio, median (max) |",
           "|---" * (len(settings) + 4) + "|"]
  for name, p in study.items():
    cells = [f"{p['switch_divergences_per_setting'][k]}, "
             f"{p['switch_eigendecompositions_per_setting'][k]:.0f} EVDs, "
             f"{p['switch_checks_per_setting'][k]:.0f} checks"
             for k in settings]
    control_evds = np.mean(list(
        p["control_eigendecompositions_per_setting"].values()))
    lines.append(f"| {name} | " + " | ".join(cells)
                 + f" | {p['control_divergences']} | {control_evds:.0f} | "
                   f"{report.fmt(p['control_loss_ratio_median'], '.3f')} "
                   f"({report.fmt(p['control_loss_ratio_max'], '.3f')}) |")
  return lines + [""]


def plot(result: dict, out_dir: pathlib.Path) -> list[pathlib.Path]:
  """``stability_divergences.png`` (diverged runs against EVDs per switch
  setting) and ``stability_switch.png`` (loss around the switch)."""
  plt = report.pyplot()
  cells = list(_cells(result, True))
  paths = []

  def grid():
    rows = -(-len(cells) // 3)
    fig, axes = plt.subplots(rows, min(3, len(cells)),
                             figsize=(3.6 * min(3, len(cells)), 3.3 * rows),
                             dpi=70, squeeze=False)
    return fig, axes.ravel()

  fig, axes = grid()
  for ax, (w, s, methods) in zip(axes, cells):
    ladder = [(m["summary"]["eigendecompositions"],
               m["summary"]["divergences"], m["hyperparameters"]
               ["check_frequency"]) for m in methods.values()
              if m["group"] == "ladder"]
    ax.plot([x for x, _, _ in ladder], [y for _, y, _ in ladder], "k.-",
            lw=1, label="Shampoo, fixed f")
    for x, y, f in ladder:
      ax.annotate(f"f={f}", (x, y), fontsize=6)
    styles = {"foam": ("o", 40), "equal": ("s", 30), "figure1": ("^", 12),
              "policy": ("d", 16)}
    for name, m in methods.items():
      if m["group"] in styles:
        marker, size = styles[m["group"]]
        ax.scatter(m["summary"]["eigendecompositions"],
                   m["summary"]["divergences"], marker=marker, s=size,
                   label=name if m["group"] in ("foam", "equal") else None)
    ax.set_xscale("log")
    ax.set_xlabel("mean EVDs per run")
    ax.set_ylabel("diverged runs")
    ax.set_title(f"{w}\n{s}", fontsize=7)
    ax.legend(fontsize=5)
  fig.suptitle("Divergences against eigendecompositions (triangles: "
               "figure-1 grid; diamonds: policy candidates)", fontsize=8)
  paths.append(report.save_figure(fig, out_dir / "stability_divergences.png"))

  curve_every = result["config"]["curve_every"]
  fig, axes = grid()
  for ax, (w, s, methods) in zip(axes, cells):
    for name in ("foam", "shampoo_f20", "shampoo_equal_evd", "policy_f1"):
      if name not in methods:
        continue
      lrs = sorted({r["lr"] for r in methods[name]["runs"]})
      run = next(r for r in methods[name]["runs"]
                 if r["lr"] == lrs[len(lrs) // 2] and r["seed"] == 0)
      curve = np.array(run["curve"], dtype=float)   # null (diverged): nan
      ax.plot(np.arange(len(curve)) * curve_every, curve, label=name, lw=1)
    ax.axvline(run["switch_step"], color="k", lw=0.5, ls=":")
    ax.set_yscale("log")
    # Diverged curves leave the plot instead of squashing the others.
    ax.set_ylim(top=DIVERGENCE_FACTOR * run["initial_loss"])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{w}\n{s}, lr {run['lr']:g}, seed {run['seed']}", fontsize=7)
    ax.legend(fontsize=5)
  fig.suptitle("Loss around the switch", fontsize=8)
  paths.append(report.save_figure(fig, out_dir / "stability_switch.png"))
  return paths


SUITE = harness.Suite(
    name="stability",
    help="divergences of FOAM and Shampoo where the data switches, at equal "
         "EVD budget, and the paper's figure-1 grid (at most 15 min)",
    presets={"full": FULL, "quick": QUICK}, run=run,
    units_of_work=units_of_work, seeds=lambda cfg: list(range(cfg.seeds)),
    markdown=markdown, plot=plot, block=lambda cfg: BLOCK,
    out="bench_stability_out", unit="run")
