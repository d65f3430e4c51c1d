"""``first_step='init_only'``: the first gradient only initialises.

SOAP's official code (and so `fo.soap` by default) uses its first gradient
to build the factor statistics and the first eigenbases, and takes no step
with it. Everything that mode changes is here:

* the first update is zero, and the momentum, the grafting second moment
  and Adam's rotated second moments keep their initial values
  (`first_update`, `rotated_moment`), while the factors accumulate the
  gradient and compute their first bases (a check on step 1: `Config`'s
  validation refuses another first check step in this mode);
* the momentum's and Adam's bias corrections count from the second gradient
  (`adam_step`), and so does the check schedule (`uniform_phase`);
* the aliases' weight decay skips the first update too
  (`skips_first_decay`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
  from foam_optax._src.config import Config
  from foam_optax._src.state import LeafState


def adam_step(step, cfg: Config):
  """The step of the momentum's and Adam's bias corrections: counted from
  the second gradient in this mode (clamped at 1 on the first step, whose
  results are discarded), else `step`."""
  if cfg.init_only_first_step:
    return jnp.maximum(step - 1, 1)
  return step


def uniform_phase(cfg: Config) -> int:
  """The check offset of every factor without stagger: -1 in this mode
  (the schedule's step count then starts at the second gradient, as
  SOAP's does), else 0."""
  return -1 if cfg.init_only_first_step else 0


def _keep_on_first_step(step, old, new):
  """`old` on the first step, else `new` (trees alike)."""
  return jax.tree.map(lambda o, n: jnp.where(step == 1, o, n), old, new)


def rotated_moment(step, old, new, cfg: Config):
  """A block class's rotated second moment: left untouched by the first
  gradient in this mode."""
  if cfg.init_only_first_step:
    return jnp.where(step == 1, old, new)
  return new


def first_update(step, direction, state: LeafState, old: LeafState,
                 cfg: Config) -> tuple[Any, LeafState]:
  """A leaf's (update, new state): in this mode on the first step a zero
  update, and the momentum and second moments of `old`, the state before
  the step; `direction` and `state` otherwise."""
  if not cfg.init_only_first_step:
    return direction, state
  direction = jnp.where(step == 1, jnp.zeros_like(direction), direction)
  state = state._replace(
      momentum=_keep_on_first_step(step, old.momentum, state.momentum),
      graft_second_moment=_keep_on_first_step(
          step, old.graft_second_moment, state.graft_second_moment))
  if state.tensor is not None:
    state = state._replace(tensor=state.tensor._replace(
        rotated_second_moment=_keep_on_first_step(
            step, old.tensor.rotated_second_moment,  # pyright: ignore[reportOptionalMemberAccess]
            state.tensor.rotated_second_moment)))
  return direction, state


def skips_first_decay(arguments: Mapping[str, Any]) -> bool:
  """Whether an alias called with `arguments` skips its weight decay on the
  first update (with ``decay_after_update``)."""
  return arguments.get("first_step") == "init_only"
