"""Skipping updates whose gradients are not finite.

A skipped step returns zero updates and keeps the state, except the skip
counters, which count it. `skip_nonfinite` does that for a whole chain; the
core transformation does it for its own state (`run_or_skip`), also when an
enclosing `skip_nonfinite` decided to skip (`skipping`).
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from jax import lax
import optax

from foam_optax._src import linalg
from foam_optax._src import microbatches
from foam_optax._src import validation
from foam_optax._src.config import Config
from foam_optax._src.state import BlockClassState, ScaleByFoamState
from foam_optax._src.state import SkipCounters


def _materialized(flag) -> jax.Array:
  """`flag`, computed once into a buffer of its own.

  A tree's finite flag is a chain of elementwise scalar operations over the
  leaves' reductions (an ``and`` per leaf). Every select of a skipped step
  reads it, and XLA's fusion copies such cheap producers into each consumer:
  on a 72-leaf GPT-2-small tree the chain was repeated in some 400 kernels
  (29,000 of the update's 115,000 HLO instructions, 7 of its 11 s of CPU
  compilation). The result of a conditional is a buffer, which fusion does
  not duplicate.
  """
  return lax.cond(flag, lambda: True, lambda: False)


def entries_finite(tree) -> jax.Array:
  """True when every entry of every leaf is finite."""
  leaves = jax.tree.leaves(tree)
  return _materialized(jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.asarray(True)])))


def gradients_finite(updates) -> jax.Array:
  """True when every leaf's sum of squares is finite in the statistics dtype.

  Rules out NaN and Inf, and gradients so large (|g| ~ 1e19 in float32) that
  their Gram matrices or squared entries would overflow. A gradient that is
  not floating-point raises, naming its leaf.
  """
  validation.check_gradient_dtypes(updates)
  leaves = jax.tree.leaves(updates)
  if not leaves:
    return jnp.asarray(True)
  return _materialized(jnp.all(jnp.stack(
      [jnp.isfinite(jnp.sum(jnp.square(g.astype(linalg.stat_dtype()))))
       for g in leaves])))


# A traced bool set by `skipping`: the enclosing `skip_nonfinite` wrapper's
# verdict, which every `scale_by_foam` update inside it obeys.
_OUTER_SKIP = contextvars.ContextVar("foam_optax_outer_skip", default=None)


@contextlib.contextmanager
def skipping(skip):
  """Within this context every `scale_by_foam` update also skips (and counts
  the step) when the traced bool `skip` is true; nested contexts combine."""
  outer = _OUTER_SKIP.get()
  token = _OUTER_SKIP.set(skip if outer is None else outer | skip)
  try:
    yield
  finally:
    _OUTER_SKIP.reset(token)


def _zeroed(skip, tree):
  return jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), tree)


def _keep_class(new: BlockClassState, old: BlockClassState,
                keep) -> BlockClassState:
  """The class state to keep on a skipped step.

  A skipped step runs with step 0 (never a check step: checks start at
  s0 >= 1), zero gradients and b2 = 1, so the factors come out exactly as
  they went in: the statistics' average is ``1·S + 0·(0·0ᵀ)`` and nothing
  else changes outside a check. They need no select, which on a CPU cost a
  pass over the largest arrays of the state.
  """
  moment = new.rotated_second_moment
  return BlockClassState(
      new.left, new.right,
      None if moment is None else keep(moment, old.rotated_second_moment))


def run_or_skip(run, inputs, state: ScaleByFoamState, step, traced,
                cfg: Config, params=None):
  """``run(inputs, state, step, traced)``, or a skipped step when the
  gradients (`inputs`: the updates and any microbatch gradients) are not
  finite (``cfg.skip_nonfinite``) or an enclosing `skip_nonfinite` skips.
  `params`, when given, lets a stuck run's error name non-finite parameters
  as its likelier cause."""
  skip = _OUTER_SKIP.get()
  if cfg.skip_nonfinite:
    own = jnp.logical_not(gradients_finite(inputs))
    skip = own if skip is None else skip | own
  if skip is None:
    return run(inputs, state, step, traced)

  # One pass, no conditional over the state: a skipped step runs with step 0
  # (no factor is checked), zero gradients and b2 = 1, which leave the
  # factors as they were (`_keep_class`); the other results are discarded by
  # selects, which XLA fuses into the arithmetic that produces them.
  # Selects, not multiplications by a 0/1 flag: NaN * 0 is NaN.
  traced = dict(traced, b2=jnp.where(skip, 1.0, cfg.b2))
  new_updates, new_state = run(_zeroed(skip, inputs), state,
                               jnp.where(skip, 0, step), traced)
  keep = lambda new, old: jnp.where(skip, old, new)
  if cfg.skip_nonfinite:
    # Otherwise only the enclosing `skip_nonfinite` skips, and it zeroes the
    # whole chain's updates itself.
    new_updates = _zeroed(skip, new_updates)
  consecutive = jnp.where(skip, optax.safe_increment(state.consecutive_skips),
                          jnp.zeros_like(state.consecutive_skips))
  if cfg.max_consecutive_skips is not None:
    validation.check_consecutive_skips(
        consecutive, cfg.max_consecutive_skips,
        True if params is None else entries_finite(params))
  # Finite entries whose squares overflow: skipped, and counted apart too.
  overflow = skip & entries_finite(inputs)
  return new_updates, state._replace(
      count=keep(step, state.count),
      nonfinite_skips=jnp.where(skip,
                                optax.safe_increment(state.nonfinite_skips),
                                state.nonfinite_skips),
      mu=jax.tree.map(keep, new_state.mu, state.mu),
      nu=jax.tree.map(keep, new_state.nu, state.nu),
      tensors=jax.tree.map(keep, new_state.tensors, state.tensors),
      classes=tuple(_keep_class(n, o, keep)
                    for n, o in zip(new_state.classes, state.classes)),
      consecutive_skips=consecutive,
      overflow_skips=jnp.where(overflow,
                               optax.safe_increment(state.overflow_skips),
                               state.overflow_skips))


def _counted(counters: SkipCounters, skip, overflow) -> SkipCounters:
  """`counters` after a step that `skip` says was skipped (or not)."""
  increment = lambda c, flag: jnp.where(flag, optax.safe_increment(c), c)
  return SkipCounters(
      nonfinite_skips=increment(counters.nonfinite_skips, skip),
      consecutive_skips=jnp.where(
          skip, optax.safe_increment(counters.consecutive_skips),
          jnp.zeros_like(counters.consecutive_skips)),
      overflow_skips=increment(counters.overflow_skips, overflow))


def skip_nonfinite(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """Skips the whole of `inner` on a step whose gradients are not finite.

  On such a step the updates are zero and every array of `inner`'s state is
  kept exactly, except the skip counters (``nonfinite_skips``,
  ``consecutive_skips``) of the foam_optax transformations inside, which
  count the step (`stats` reports them; `scale_by_foam`'s also obey its
  ``max_consecutive_skips``). Use it around a chain that adds anything after
  `scale_by_foam` (weight decay, a schedule, `optax.partition` with AdamW):
  `scale_by_foam` on its own skips only its own state. The aliases (`foam`,
  `shampoo`, `soap`, `asgo`, `dasgo`, `bias_corrected_adamw`) and
  `partition` already apply it.

  The per-microbatch gradients an `update` is given
  (``microbatch_grads=...``) are checked too, and when no transformation
  inside uses them (every bias correction off) it warns at trace time
  (`warnings.warn`, message starting ``foam_optax: microbatch_grads
  ignored``). `inner` is traced once: its new state is selected against the
  old one (``jnp.where`` on the finite flag, fused by XLA into the
  arithmetic), and the foam_optax transformations inside skip their own
  work.

  Example:
    >>> import optax, foam_optax as fo
    >>> tx = fo.skip_nonfinite(optax.chain(
    ...     fo.scale_by_foam(), optax.add_decayed_weights(1e-4),
    ...     optax.scale_by_learning_rate(1e-3)))
  """
  is_own = lambda x: isinstance(x, (ScaleByFoamState, SkipCounters))

  def update_fn(updates, state, params=None, **extra_args):
    # Per-microbatch gradients (bias-corrected optimizers) count too.
    micro = extra_args.get("microbatch_grads")
    skip = jnp.logical_not(gradients_finite((updates, micro)))
    with skipping(skip), microbatches.tracking(micro):
      new_updates, new_state = inner.update(updates, state, params,
                                            **extra_args)
    overflow = skip & entries_finite((updates, micro))

    def keep(new, old):
      if isinstance(new, ScaleByFoamState):
        return new      # already kept what a skipped step must keep
      if isinstance(new, SkipCounters):
        return _counted(old, skip, overflow)
      return jnp.where(skip, old, new)

    new_state = jax.tree.map(keep, new_state, state, is_leaf=is_own)
    return _zeroed(skip, new_updates), new_state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)
