"""`stats`: counters and damping summaries read from an optimizer state."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from foam_optax._src.factors import FactorState
from foam_optax._src.transform import ScaleByFoamState


def _find(tree, kind):
  return [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, kind))
          if isinstance(x, kind)]


def stats(opt_state) -> dict[str, jax.Array]:
  """Diagnostics of every foam_optax transformation inside `opt_state`.

  Works on the state of `scale_by_foam` itself, of an alias (`foam`,
  `shampoo`, `soap`) or of any optax chain or wrapper around them
  (`inject_hyperparams`, `MultiSteps`, `masked`, ...). Figures are summed or
  reduced over all factors of all such transformations found.

  Returns:
    A dict of scalar arrays:
      ``eigendecompositions``: fresh eigendecompositions (or power-QR
        refreshes) so far, over all factors;
      ``checks``: check-step evaluations so far;
      ``damping_max``, ``damping_mean``: current damping over factors;
      ``proxy_max``: largest last staleness measure over factors;
      ``nonfinite_skips``: updates skipped for non-finite gradients;
      ``eigendecomposition_failures``: refreshes that failed and kept the
        previous basis;
      ``num_factors``: number of preconditioned factors;
      ``step``: updates applied (largest over transformations found).

  Raises:
    ValueError: if `opt_state` holds no foam_optax state.
  """
  states = _find(opt_state, ScaleByFoamState)
  if not states:
    raise ValueError("opt_state holds no foam_optax transformation state.")
  factors = _find([s.groups for s in states], FactorState)
  int_zero = jnp.zeros((), jnp.int32)

  def total(field):
    return sum((jnp.sum(getattr(f, field)) for f in factors), int_zero)

  damping = [f.damping for f in factors]
  proxy = [f.proxy for f in factors]
  if damping:
    all_damping = jnp.concatenate(damping)
    damping_max, damping_mean = jnp.max(all_damping), jnp.mean(all_damping)
    proxy_max = jnp.max(jnp.concatenate(proxy))
  else:
    damping_max = damping_mean = proxy_max = jnp.zeros(())
  return {
      "eigendecompositions": total("refreshes"),
      "checks": total("checks"),
      "damping_max": damping_max,
      "damping_mean": damping_mean,
      "proxy_max": proxy_max,
      "nonfinite_skips": sum((s.nonfinite_skips for s in states), int_zero),
      "eigendecomposition_failures": total("failures"),
      "num_factors": jnp.asarray(sum(f.damping.shape[0] for f in factors),
                                 jnp.int32),
      "step": jnp.max(jnp.stack([s.count for s in states])),
  }
