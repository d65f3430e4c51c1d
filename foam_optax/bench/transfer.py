"""`foam-bench --suite transfer`: learning rates that transfer across widths.

A character-level MLP language model (the previous `context` characters,
one-hot, predict the next; bias-free, as the official code's models) is
trained at four widths with a grid of learning rates spaced by factors of 2,
for AdamW, FOAM (grafted), SOAP (blocks of 128) and Muon (optax's), each
twice: in the standard parametrisation (one learning rate for every leaf)
and with μP (`fo.mup_multipliers` tuned at the narrowest width, applied by
`fo.scale_by_mup`). Both arms use the learning-rate-independent weight decay
recipe of `fo.mup_multipliers`' docstring; under μP it scales as 1/width.
At the base width the two arms are the same optimizer, so it is run once.

Reported per optimizer and arm: the optimal learning rate per width and its
drift across widths (in grid steps), the held-out loss at the rate tuned at
the base width against the width's best, and the maximal-update check at
the base-tuned rate: the change that a layer's own update makes to its
output, RMS over held-out inputs, ‖Δh‖ = ‖h₁ ΔW_hidden2‖ for the last
hidden layer and ‖Δf‖ = ‖h₂ ΔW_readout‖ for the logits, with ΔW the weight
change over `delta_h_steps` steps from mid-training (the inputs h taken at
its start). μP asks for both to stay Θ(1) as the width grows. The model is
parametrised as μP needs at every width (inputs N(0, 1/context), hidden
layers N(0, 1/fan_in), a zero readout), as in the official code: the arms
differ only in the learning rates and the decay.

Every run of one (optimizer, width) shares one compiled `lax.scan` over the
steps: the learning rate, the multipliers and the decay are traced
arguments. Imports only public `foam_optax` names.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import foam_optax as fo
from foam_optax.bench import harness, measure, report, workloads

BLOCK = harness.Block(
    "## Hyperparameter transfer across widths (`foam-bench --suite "
    "transfer`)", "<!-- bench-transfer:start -->",
    "<!-- bench-transfer:end -->")
OPTIMIZERS = ("adamw", "foam", "soap", "muon")
# μP rule of each optimizer (`fo.mup_multipliers`' `optimizer`).
RULES: dict[str, Any] = {"adamw": "adam", "foam": "grafted", "soap": "soap",
                         "muon": "muon"}
SOAP_BLOCK_SIZE = 128
WD_X_WIDTH = 0.064   # weight decay 2e-3 at the base width 32; under μP 0.064/width
LOSS_TOLERANCE = 0.01   # the paper's: within 1% of the width's best
DRIFT_TOLERANCE = 1     # grid steps
DELTA_H_SPREAD = 2.0    # flat: every width within this factor of the base


@dataclasses.dataclass(frozen=True)
class TransferConfig:
  """Sizes of the transfer suite (`FULL`) or of its smoke run (`QUICK`).

  Attributes:
    widths: hidden widths; the first is the base where rates are tuned.
    steps: training steps per run (warmup 10%, then cosine decay to 0).
    batch_size: sequences per step.
    context: characters the model sees.
    lr_grids: per optimizer, the learning rates (factors of 2).
    delta_h_steps: steps of the weight change of the ‖Δh‖ check, from step
      ``steps // 2`` on.
    eval_size: held-out examples of the final loss.
    fast_compile: compile with `measure.fast_compile()` (a smoke run's
      timings mean nothing).
  """

  widths: tuple
  steps: int
  batch_size: int
  lr_grids: dict
  delta_h_steps: int
  context: int = 4
  eval_size: int = 4096
  optimizers: tuple = OPTIMIZERS
  fast_compile: bool = False


def _grid(low: int, high: int) -> tuple:
  """2**low, ..., 2**high."""
  return tuple(2.0 ** k for k in range(low, high + 1))


# Widths 32-256 (8x) fit the 20-minute budget on 2 CPU cores; at 512 one
# FOAM or SOAP run alone takes 25-40 s there.
FULL = TransferConfig(
    widths=(32, 64, 128, 256), steps=200, batch_size=64, delta_h_steps=5,
    lr_grids={"adamw": _grid(-10, -3), "foam": _grid(-9, -2),
              "soap": _grid(-10, -3), "muon": _grid(-8, -1)})
# Smoke run: two tiny widths, two rates, a few steps, one context
# character; AdamW and SOAP (blocked rule) only, to stay short: FOAM's and
# Muon's paths differ from these in their direction and multipliers alone,
# which `tests/bench/test_transfer.py` checks without training.
QUICK = TransferConfig(
    widths=(8, 16), steps=8, batch_size=8, delta_h_steps=2, context=1,
    eval_size=128, optimizers=("adamw", "soap"),
    lr_grids={"adamw": _grid(-7, -6), "soap": _grid(-7, -6)},
    fast_compile=True)


# ------------------------------------------------------------------ model


class CharData:
  """Next-character prediction on `pydoc_data.topics`' text (the last 10%
  held out): windows of `context` + 1 characters."""

  def __init__(self, context: int):
    text = workloads._pydoc_text()
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    tokens = np.fromiter((lookup[c] for c in text), np.int32, len(text))
    split = int(0.9 * len(tokens))
    self.train, self.test = tokens[:split], tokens[split:]
    self.vocab, self.context = len(chars), context

  def windows(self, data, starts):
    return data[starts[..., None] + np.arange(self.context + 1)]

  def batches(self, seed: int, steps: int, batch_size: int) -> jax.Array:
    starts = np.random.default_rng(seed).integers(
        0, len(self.train) - self.context - 1, (steps, batch_size))
    return jnp.asarray(self.windows(self.train, starts))

  def held_out(self, size: int, seed: int = 99) -> jax.Array:
    starts = np.random.default_rng(seed).integers(
        0, len(self.test) - self.context - 1, size)
    return jnp.asarray(self.windows(self.test, starts))


def init_params(width: int, data: CharData, seed: int = 0) -> dict:
  """Inputs N(0, 1/context) (a Θ(1) sum of `context` rows), hidden layers
  N(0, 1/fan_in), readout zero: the μP initialisation at every width."""
  k_embed, k_h1, k_h2 = jax.random.split(jax.random.PRNGKey(seed), 3)
  normal = lambda key, shape, std: std * jax.random.normal(key, shape)
  return {"embed": normal(k_embed, (data.context * data.vocab, width),
                          1 / math.sqrt(data.context)),
          "hidden1": normal(k_h1, (width, width), 1 / math.sqrt(width)),
          "hidden2": normal(k_h2, (width, width), 1 / math.sqrt(width)),
          "readout": jnp.zeros((width, data.vocab))}


def layer_inputs(params, windows, vocab: int) -> dict:
  """Each matrix layer's input activations (after the embedding's sum)."""
  inputs = windows[..., :-1]
  rows = inputs + vocab * jnp.arange(inputs.shape[-1])
  h0 = jax.nn.gelu(jnp.sum(params["embed"][rows], axis=-2))
  h1 = jax.nn.gelu(h0 @ params["hidden1"])
  h2 = jax.nn.gelu(h1 @ params["hidden2"])
  return {"hidden1": h0, "hidden2": h1, "readout": h2}


def loss_fn(params, windows, vocab: int):
  logits = layer_inputs(params, windows, vocab)["readout"] @ params["readout"]
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits, windows[..., -1]))


# -------------------------------------------------------------- optimizers


def direction(name: str) -> optax.GradientTransformation:
  """Each optimizer's update before the learning rate."""
  if name == "adamw":
    return optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)
  if name == "foam":
    return fo.scale_by_foam()   # fo.foam's defaults: the paper's, grafted
  if name == "soap":
    return fo.scale_by_soap(block_size=SOAP_BLOCK_SIZE)
  if name == "muon":
    # The alias at unit rate, sign restored (its Adam half is unused here:
    # every leaf is a matrix).
    return optax.chain(optax.contrib.muon(1.0), optax.scale(-1.0))
  raise ValueError(f"unknown optimizer {name!r}")


def _optax_muon_shape_factor(shape) -> float:
  """`optax.contrib.muon`'s own width factor √max(1, fan_out / fan_in)."""
  return math.sqrt(max(1.0, shape[1] / shape[0]))


def multipliers(name: str, params, base_params) -> dict:
  """μP multipliers of `name`; for Muon, net of the alias's own factor."""
  rule = RULES[name]
  result = fo.mup_multipliers(
      params, base_params, optimizer=rule,
      block_size=SOAP_BLOCK_SIZE if name == "soap" else None,
      embedding=lambda path: "embed" in path,
      readout=lambda path: "readout" in path)
  if name == "muon":
    result = jax.tree.map(
        lambda m, p, b: m * _optax_muon_shape_factor(b.shape)
        / _optax_muon_shape_factor(p.shape), result, params, base_params)
  return result


def recipe(core, multipliers, learning_rate, weight_decay, schedule):
  """`fo.mup_multipliers`' recipe: μP rates, decay independent of the
  rate (matrices only), both following `schedule`."""
  return optax.chain(
      core, fo.scale_by_mup(multipliers), optax.scale(learning_rate),
      optax.add_decayed_weights(
          weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
      optax.scale_by_schedule(schedule), optax.scale(-1.0))


class Runner:
  """One compiled training run per (optimizer, width)."""

  def __init__(self, name: str, width: int, cfg: TransferConfig,
               data: CharData, batches, held_out):
    self.name, self.width, self.cfg = name, width, cfg
    self.params = init_params(width, data)
    self.batches, self.held_out = batches, held_out
    vocab, steps = data.vocab, cfg.steps
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, 1.0, warmup_steps=max(1, steps // 10), decay_steps=steps)
    probe = held_out[:512]
    start = steps // 2
    end = start + cfg.delta_h_steps

    def run(params, learning_rate, mults, weight_decay, batches):
      tx = recipe(direction(name), mults, learning_rate, weight_decay,
                  schedule)

      def step(carry, xs):
        params, state, at_start, at_end = carry
        index, batch = xs
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, vocab)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        keep = lambda saved, at: jax.tree.map(
            lambda s, p: jnp.where(index == at - 1, p, s), saved, params)
        return (params, state, keep(at_start, start), keep(at_end, end)), loss

      (final, _, at_start, at_end), losses = jax.lax.scan(
          step, (params, tx.init(params), params, params),
          (jnp.arange(steps), batches))
      inputs = layer_inputs(at_start, probe, vocab)
      own_change = lambda layer: jnp.sqrt(jnp.mean(
          (inputs[layer] @ (at_end[layer] - at_start[layer])) ** 2))
      return {"held_out_loss": loss_fn(final, held_out, vocab),
              "train_loss": jnp.mean(losses[-max(1, steps // 10):]),
              "delta_h": own_change("hidden2"),
              "delta_f": own_change("readout")}

    self._run = jax.jit(run, compiler_options=measure.compiler_options(
        cfg.fast_compile))

  def train(self, learning_rate: float, mults, weight_decay: float) -> dict:
    out = self._run(self.params, jnp.float32(learning_rate),
                    jax.tree.map(jnp.float32, mults),
                    jnp.float32(weight_decay), self.batches)
    return {k: float(v) for k, v in out.items()}


# --------------------------------------------------------------------- run


def arms(widths) -> list:
  """(width, arm) pairs to run: the base width once, as 'sp' (= 'mup')."""
  return [(widths[0], "sp")] + [(w, arm) for w in widths[1:]
                                for arm in ("sp", "mup")]


def units_of_work(cfg: TransferConfig) -> int:
  return sum(len(cfg.lr_grids[n]) * len(arms(cfg.widths)) * cfg.steps
             for n in cfg.optimizers)


def run(cfg: TransferConfig, context: harness.Context) -> dict:
  """Trains every (optimizer, width, arm, learning rate); returns the runs,
  the per-width summaries and the targets."""
  data = CharData(cfg.context)
  batches = data.batches(0, cfg.steps, cfg.batch_size)
  held_out = data.held_out(cfg.eval_size)
  base_width = cfg.widths[0]
  base_params = init_params(base_width, data)
  runs, compile_seconds = {}, 0.0
  for name in cfg.optimizers:
    runs[name] = {"sp": {}, "mup": {}}
    for width in cfg.widths:
      runner = Runner(name, width, cfg, data, batches, held_out)
      mup = multipliers(name, runner.params, base_params)
      ones = jax.tree.map(lambda _: 1.0, mup)
      for arm in [a for w, a in arms(cfg.widths) if w == width]:
        results = []
        for lr in cfg.lr_grids[name]:
          result, seconds = measure.call_timed(
              runner.train, lr, mup if arm == "mup" else ones,
              WD_X_WIDTH / (width if arm == "mup" else base_width))
          result["lr"], result["seconds"] = lr, seconds
          results.append(result)
          context.progress(cfg.steps)
        runs[name][arm][str(width)] = {
            "runs": results,
            "multipliers": mup if arm == "mup" else ones}
        if width == base_width:
          runs[name]["mup"][str(width)] = runs[name]["sp"][str(width)]
      # The first run of each runner paid the compilation.
      first = runs[name]["sp"][str(width)]["runs"][0]
      compile_seconds += first["seconds"] - min(
          r["seconds"] for r in runs[name]["sp"][str(width)]["runs"])
  summaries = {name: {arm: summarize(per_width, cfg.widths)
                      for arm, per_width in per_arm.items()}
               for name, per_arm in runs.items()}
  return {"config": {"widths": list(cfg.widths), "steps": cfg.steps,
                     "batch_size": cfg.batch_size, "context": cfg.context,
                     "vocab": data.vocab, "delta_h_steps": cfg.delta_h_steps,
                     "eval_size": cfg.eval_size,
                     "lr_grids": {n: list(cfg.lr_grids[n])
                                  for n in cfg.optimizers},
                     "wd_x_width": WD_X_WIDTH,
                     "soap_block_size": SOAP_BLOCK_SIZE},
          "compile_seconds": compile_seconds, "runs": runs,
          "summaries": summaries, "targets": targets(summaries, cfg.widths)}


def _loss(run) -> float:
  loss = run["held_out_loss"]
  return loss if math.isfinite(loss) else math.inf


def summarize(per_width: dict, widths) -> dict:
  """Optimal rate per width, its drift, and the loss, ‖Δh‖ and ‖Δf‖ at the
  rate that is optimal at the base width."""
  base_runs = per_width[str(widths[0])]["runs"]
  base_best = min(base_runs, key=_loss)
  base_lr = base_best["lr"]
  rows = {}
  for width in widths:
    results = per_width[str(width)]["runs"]
    best = min(results, key=_loss)
    rates = [r["lr"] for r in results]
    at_base = next(r for r in results if r["lr"] == base_lr)
    rows[str(width)] = {
        "optimal_lr": best["lr"],
        "optimal_at_grid_edge": best["lr"] in (min(rates), max(rates)),
        "best_loss": _loss(best), "loss_at_base_lr": _loss(at_base),
        "loss_ratio": _loss(at_base) / _loss(best),
        "delta_h_at_base_lr": at_base["delta_h"],
        "delta_f_at_base_lr": at_base["delta_f"]}
  exponents = [math.log2(r["optimal_lr"]) for r in rows.values()]
  summary = {"base_lr": base_lr, "widths": rows,
             "drift_grid_steps": max(exponents) - min(exponents),
             "max_loss_ratio": max(r["loss_ratio"] for r in rows.values())}
  for key in ("delta_h", "delta_f"):
    values = [r[f"{key}_at_base_lr"] for r in rows.values()]
    summary[f"{key}_spread"] = max(values) / min(values)
    summary[f"{key}_widest_over_base"] = values[-1] / values[0]
  return summary


def targets(summaries: dict, widths) -> dict:
  """The paper's claims, per optimizer: under μP the optimal rate drifts by
  at most one grid step and the base-tuned rate is within 1% of each
  width's best; without μP the optimum drifts; ‖Δh‖ is flat under μP."""
  result = {}
  span = f"widths {widths[0]}–{widths[-1]}"
  for name, arms_ in summaries.items():
    mup, sp = arms_["mup"], arms_["sp"]
    result[f"{name}_mup_drift"] = {
        "target": f"{name}, μP: optimal lr drifts ≤ {DRIFT_TOLERANCE} grid "
                  f"step over {span}",
        "measured": f"{mup['drift_grid_steps']:.0f} steps "
                    f"(SP: {sp['drift_grid_steps']:.0f})",
        "met": mup["drift_grid_steps"] <= DRIFT_TOLERANCE}
    result[f"{name}_mup_loss_at_base_lr"] = {
        "target": f"{name}, μP: loss at the base-tuned lr within "
                  f"{100 * LOSS_TOLERANCE:.0f}% of each width's best",
        "measured": f"worst ratio {mup['max_loss_ratio']:.4f} (SP: "
                    f"{sp['max_loss_ratio']:.4f})",
        "met": mup["max_loss_ratio"] <= 1 + LOSS_TOLERANCE}
    result[f"{name}_sp_drifts"] = {
        "target": f"{name}, without μP: the optimal lr drifts > "
                  f"{DRIFT_TOLERANCE} grid step over {span}",
        "measured": f"{sp['drift_grid_steps']:.0f} steps",
        "met": sp["drift_grid_steps"] > DRIFT_TOLERANCE}
    result[f"{name}_mup_delta_h_flat"] = {
        "target": f"{name}, μP: ‖Δh‖ (last hidden layer) and ‖Δf‖ (logits) "
                  f"at the base-tuned lr within {DELTA_H_SPREAD:g}× across "
                  f"widths",
        "measured": f"max/min ‖Δh‖ {mup['delta_h_spread']:.2f}, ‖Δf‖ "
                    f"{mup['delta_f_spread']:.2f} (SP: "
                    f"{sp['delta_h_spread']:.2f}, {sp['delta_f_spread']:.2f})",
        "met": max(mup["delta_h_spread"],
                   mup["delta_f_spread"]) <= DELTA_H_SPREAD}
  return result


# ------------------------------------------------------------------ report


def _lr(value: float) -> str:
  return f"2^{math.log2(value):.0f}"


def markdown(result: dict) -> str:
  """The learning-rate table, the ‖Δh‖ table, then the targets."""
  cfg = result["config"]
  widths = cfg["widths"]
  header = " | ".join(f"width {w}" for w in widths)
  rule = "|---|---|" + "---|" * len(widths)
  lines = [
      f"Workload: char MLP LM on pydoc_data.topics (vocab {cfg['vocab']}, "
      f"context {cfg['context']}, one-hot inputs → embedding → 2 hidden "
      f"layers of the width → readout, GELU, no biases), {cfg['steps']} "
      f"steps of batch {cfg['batch_size']}, warmup 10% then cosine; "
      f"held-out loss on {cfg['eval_size']} windows; seed 0. Base width "
      f"{widths[0]}; weight decay {cfg['wd_x_width']:g}/width under μP, "
      f"{cfg['wd_x_width'] / widths[0]:g} without (both independent of the "
      f"lr). SOAP uses blocks of {cfg['soap_block_size']}.", "",
      "Optimal learning rate per width · held-out loss at the base-tuned "
      "rate (its ratio to the width's best); * marks an optimum at an end "
      "of the grid:", "",
      f"| optimizer | arm | {header} | drift (grid steps) |", rule + "---|"]
  for name, arms_ in result["summaries"].items():
    for arm in ("sp", "mup"):
      s = arms_[arm]
      cells = []
      for w in widths:
        r = s["widths"][str(w)]
        edge = "*" if r["optimal_at_grid_edge"] else ""
        cells.append(f"{_lr(r['optimal_lr'])}{edge} · "
                     f"{r['loss_at_base_lr']:.4f} ({r['loss_ratio']:.3f})")
      lines.append(f"| {name} | {_arm(arm)} | " + " | ".join(cells)
                   + f" | {s['drift_grid_steps']:.0f} |")
  lines += [
      "", f"Maximal-update check at the base-tuned rate: ‖Δh‖ / ‖Δf‖, the "
      f"RMS change of the last hidden layer's output / of the logits made "
      f"by that layer's own weight change over {cfg['delta_h_steps']} steps "
      f"from step {cfg['steps'] // 2}, on held-out inputs:", "",
      f"| optimizer | arm | {header} | max/min ‖Δh‖ | max/min ‖Δf‖ |",
      rule + "---|---|"]
  for name, arms_ in result["summaries"].items():
    for arm in ("sp", "mup"):
      s = arms_[arm]
      cells = [f"{s['widths'][str(w)]['delta_h_at_base_lr']:.3g} / "
               f"{s['widths'][str(w)]['delta_f_at_base_lr']:.3g}"
               for w in widths]
      lines.append(f"| {name} | {_arm(arm)} | " + " | ".join(cells)
                   + f" | {s['delta_h_spread']:.2f} | "
                   f"{s['delta_f_spread']:.2f} |")
  lines += ["", "#### Targets", "", report.targets_table(result["targets"])]
  return "\n".join(lines)


def _arm(arm: str) -> str:
  return "μP" if arm == "mup" else "SP"


def plot(result: dict, out_dir: pathlib.Path) -> list[pathlib.Path]:
  """``transfer_lr.png`` (held-out loss vs lr, one curve per width; columns
  without and with μP) and ``transfer_delta_h.png`` (‖Δh‖ and ‖Δf‖ vs
  width)."""
  plt = report.pyplot()
  names = list(result["summaries"])
  widths = result["config"]["widths"]
  fig, axes = plt.subplots(len(names), 2, figsize=(9, 2.6 * len(names)),
                           dpi=70, squeeze=False)
  for row, name in enumerate(names):
    finite = [r["held_out_loss"] for arm in ("sp", "mup") for w in widths
              for r in result["runs"][name][arm][str(w)]["runs"]
              if r["held_out_loss"] is not None]
    for col, arm in enumerate(("sp", "mup")):
      ax = axes[row][col]
      for width in widths:
        runs = result["runs"][name][arm][str(width)]["runs"]
        losses = [np.nan if r["held_out_loss"] is None else r["held_out_loss"]
                  for r in runs]
        line, = ax.plot([r["lr"] for r in runs], losses, marker=".",
                        label=f"width {width}")
        best = result["summaries"][name][arm]["widths"][str(width)]
        ax.plot(best["optimal_lr"], best["best_loss"], marker="*", ms=10,
                color=line.get_color())
      ax.axvline(result["summaries"][name][arm]["base_lr"], color="k",
                 lw=0.6, ls=":")
      if finite:   # the interesting range: from the best to 1 nat above
        ax.set_ylim(min(finite) - 0.05, min(finite) + 1.0)
      ax.set_xscale("log", base=2)
      ax.set_title(f"{name}, {_arm(arm)}", fontsize=9)
      ax.set_xlabel("learning rate (dotted: tuned at the base width)")
      ax.set_ylabel("held-out loss")
      ax.legend(fontsize=6)
  paths = [report.save_figure(fig, out_dir / "transfer_lr.png")]

  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=70)
  for ax, key, label in ((axes[0], "delta_h", "‖Δh‖, last hidden layer"),
                         (axes[1], "delta_f", "‖Δf‖, logits")):
    for index, name in enumerate(names):
      color = f"C{index}"
      for arm, style in (("sp", "--"), ("mup", "-")):
        rows = result["summaries"][name][arm]["widths"]
        ax.plot(widths, [rows[str(w)][f"{key}_at_base_lr"] for w in widths],
                style, marker=".", color=color, label=f"{name} {_arm(arm)}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("width")
    ax.set_ylabel(f"RMS {label}")
  axes[1].legend(fontsize=6, ncol=2)
  fig.suptitle("Maximal-update check at the base-tuned learning rate",
               fontsize=9)
  paths.append(report.save_figure(fig, out_dir / "transfer_delta_h.png"))
  return paths


SUITE = harness.Suite(
    name="transfer",
    help="learning-rate sweeps at 4 widths with and without muP for AdamW, "
         "FOAM, SOAP and Muon (under 20 min)",
    presets={"full": FULL, "quick": QUICK}, run=run,
    units_of_work=units_of_work, seeds=lambda cfg: [0], markdown=markdown,
    plot=plot, block=lambda cfg: BLOCK, out="bench_transfer_out")
