"""`skip_nonfinite`: skipping a whole chain's update when its gradients are
not finite.

A skipped step returns zero updates and keeps the state, except the skip
counters, which count it. `skip_nonfinite` does that for a whole chain; the
core transformation does it for its own state (`step.run_or_skip`), also
when an enclosing `skip_nonfinite` decided to skip (`step.skipped_when`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from foam_optax._src import microbatches
from foam_optax._src.state import ScaleByFoamState, SkipCounters
from foam_optax._src.step import entries_finite, gradients_finite
from foam_optax._src.step import skipped_when, zeroed


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
    with skipped_when(skip), microbatches.tracking(micro):
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
    return zeroed(skip, new_updates), new_state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)
