"""Benchmarked optimizers and their learning-rate grids.

Every optimizer is built with a unit peak learning rate (a short linear
warmup to 1.0, then constant); the trainer (`foam_optax.bench.trainer`)
multiplies the updates by the swept learning rate, which is exact because
every update here is linear in the learning rate. One compiled train step
then serves the whole sweep.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, Optional

import jax
import optax

import foam_optax as fo

WARMUP_STEPS = 10
WEIGHT_DECAY = 1e-4
START_PRECONDITIONING = 20   # same grafting-only warm start for every Shampoo
ADAM_GRID = (3e-3, 1e-2, 3e-2)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """A named optimizer configuration.

  Attributes:
    name: identifier on the command line and in reports.
    build: unit-learning-rate schedule -> optax.GradientTransformation.
    lr_grid: peak learning rates tried in the sweep.
    settings: hyperparameters, recorded in the report.
    foam_family: whether `fo.stats` applies to its state.
  """

  name: str
  build: Callable[[optax.Schedule], optax.GradientTransformation]
  lr_grid: tuple
  settings: dict
  foam_family: bool = False


def unit_schedule() -> optax.Schedule:
  return optax.linear_schedule(0.1, 1.0, WARMUP_STEPS)


def _shampoo_settings(check_frequency):
  return dict(check_frequency=check_frequency, b1=0.95, b2=0.995,
              epsilon=1e-9, exponent=2, block_size=1024,
              start_preconditioning_step=START_PRECONDITIONING,
              weight_decay=WEIGHT_DECAY)


FOAM_PAPER = dict(_shampoo_settings(20), threshold=0.75, max_epsilon=3e-7)
FOAM_TUNED = dict(_shampoo_settings(10), threshold=1.5, max_epsilon=3e-6)
# Decay before the learning rate (optax's order), not after the update as
# the official SOAP: the trainer scales the updates by the swept rate, which
# needs an update linear in it (the two orders differ by lr²·wd·u).
SOAP_SETTINGS = dict(b1=0.95, b2=0.95, epsilon=1e-8, check_frequency=10,
                     weight_decay=WEIGHT_DECAY, decay_after_update=False)
SOAP_FOAM_SETTINGS = dict(SOAP_SETTINGS, controller="foam", threshold=0.75,
                          controller_epsilon=1e-9, max_epsilon=3e-7)
MUON_SETTINGS = dict(beta=0.95, weight_decay=WEIGHT_DECAY)
# One-sided FOAM: FOAM's paper settings with one factor per matrix, on its
# smaller side.
FOAM_ONE_SIDED = dict(FOAM_PAPER, one_sided=True)
# The official ASGO/DASGO hyperparameters (infinity-stars/ASGO@d3ef14b) but
# the bench's shared weight decay. Their update (RMS 0.2, then the decay,
# then the learning rate) is linear in the learning rate, as the trainer
# needs: p(1 - lr·wd) - lr·u = p - lr·(u + wd·p).
ASGO_SETTINGS = dict(b1=0.9, b2=0.8, epsilon=1e-10, root_method="polar_express",
                     root_iterations=10, check_frequency=1,
                     weight_decay=WEIGHT_DECAY)
# ASGO's update with FOAM's control of the one factor: a cached eigenbasis,
# checked every 20 steps, refreshed when FOAM's staleness proxy asks.
ASGO_FOAM_SETTINGS = dict(ASGO_SETTINGS, root_method="eigh", controller="foam",
                          check_frequency=20)
DASGO_SETTINGS = dict(b1=0.9, b2=0.95, epsilon=1e-8, weight_decay=WEIGHT_DECAY)
# Their update has RMS 0.2 whatever the gradient's scale: the optimum sits
# higher than Adam's on the digits models (3e-2..1e-1), at the official 1e-2
# on the Transformer and the quadratics.
ASGO_GRID = (1e-2, 3e-2, 1e-1)
# Adam for vectors and embeddings, as the official ASGO runs.
OFFICIAL_ASGO_ADAM: dict[str, Any] = dict(b1=0.9, b2=0.95, eps=1e-8)


def adam_routed(alias):
  """`alias` on weight matrices and kernels, Adam (`OFFICIAL_ASGO_ADAM`, no
  weight decay, the same learning rate) on vectors and embeddings, as the
  official ASGO runs route them."""
  def factory(learning_rate, **settings):
    return fo.partition(
        alias(learning_rate, **settings),
        optax.adam(learning_rate, **OFFICIAL_ASGO_ADAM),
        bias_and_norm_pattern="", embedding_pattern="emb")
  return factory


def make_spec(name: str, factory: Callable[..., optax.GradientTransformation],
              settings: dict, grid: tuple = ADAM_GRID,
              foam_family: bool = True) -> OptimizerSpec:
  """``factory(learning_rate=lr, **settings)`` as a spec named `name`."""
  return OptimizerSpec(
      name=name, build=lambda lr: factory(learning_rate=lr, **settings),
      lr_grid=grid, settings=settings, foam_family=foam_family)


def distributed_shampoo_module() -> Optional[types.ModuleType]:
  """Google's `precondition.distributed_shampoo` adapted to current JAX.

  precondition-opt 0.3.0 calls `jax.tree_map`, `jax.tree_flatten` and
  `jax.tree_unflatten`, which current JAX removed; the module's `jax`
  reference is swapped for a proxy that supplies them from `jax.tree` and
  forwards everything else. Returns None when the package is not installed.
  """
  try:
    from precondition import distributed_shampoo  # pyright: ignore[reportMissingImports]
  except ImportError:
    return None
  if not hasattr(distributed_shampoo.jax, "tree_map"):
    proxy = types.ModuleType("jax_with_tree_aliases")
    aliases = {"__getattr__": lambda name: getattr(jax, name),
               "tree_map": jax.tree.map, "tree_flatten": jax.tree.flatten,
               "tree_unflatten": jax.tree.unflatten}
    for name, value in aliases.items():
      setattr(proxy, name, value)
    distributed_shampoo.jax = proxy
  return distributed_shampoo


def _distributed_shampoo_spec(module) -> OptimizerSpec:
  settings = dict(block_size=1024, beta1=0.95, beta2=0.995,
                  preconditioning_compute_steps=20,
                  start_preconditioning_step=START_PRECONDITIONING,
                  graft_type="RMSPROP_NORMALIZED", weight_decay=WEIGHT_DECAY,
                  decoupled_weight_decay=True)

  def build(lr):
    kwargs = dict(settings, graft_type=module.GraftingType[
        settings["graft_type"]])
    return module.distributed_shampoo(lr, **kwargs)

  return OptimizerSpec("distributed_shampoo_f20", build, ADAM_GRID, settings)


def optimizer_specs() -> dict[str, OptimizerSpec]:
  """All available optimizers by name (the external peer only if importable;
  it is not in `DEFAULT_OPTIMIZERS`, see BENCHMARKS.md)."""
  specs = [
      make_spec("adamw", optax.adamw, dict(b1=0.9, b2=0.999, eps=1e-8,
                                       weight_decay=WEIGHT_DECAY),
            foam_family=False),
      make_spec("muon", optax.contrib.muon, MUON_SETTINGS,
            grid=(1e-2, 3e-2, 1e-1), foam_family=False),
      make_spec("shampoo_f1", fo.shampoo, _shampoo_settings(1)),
      make_spec("shampoo_f20", fo.shampoo, _shampoo_settings(20)),
      make_spec("shampoo_f100", fo.shampoo, _shampoo_settings(100)),
      make_spec("foam", fo.foam, FOAM_PAPER),
      make_spec("foam_tuned", fo.foam, FOAM_TUNED),
      make_spec("soap", fo.soap, SOAP_SETTINGS),
      # SOAP's eigenbasis refreshed by FOAM's staleness proxy instead of
      # every check_frequency steps.
      make_spec("soap_foam", fo.soap, SOAP_FOAM_SETTINGS),
      make_spec("foam_one_sided", fo.foam, FOAM_ONE_SIDED),
      make_spec("asgo", adam_routed(fo.asgo), ASGO_SETTINGS, grid=ASGO_GRID),
      make_spec("asgo_foam", adam_routed(fo.asgo), ASGO_FOAM_SETTINGS,
            grid=ASGO_GRID),
      # DASGO's state has no factor for `fo.stats` to read.
      make_spec("dasgo", adam_routed(fo.dasgo), DASGO_SETTINGS, grid=ASGO_GRID,
            foam_family=False),
  ]
  module = distributed_shampoo_module()
  if module is not None:
    specs.append(_distributed_shampoo_spec(module))
  return {spec.name: spec for spec in specs}


# The recorded default run (BENCHMARKS.md). The ASGO family and one-sided
# FOAM run with --optimizers; scripts/archive/asgo_comparison.py compares
# them.
DEFAULT_OPTIMIZERS = ("adamw", "muon", "shampoo_f1", "shampoo_f20",
                      "shampoo_f100", "foam", "foam_tuned", "soap", "soap_foam")
