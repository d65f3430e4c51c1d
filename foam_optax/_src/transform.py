"""`scale_by_foam`: the core transformation behind every optimizer here.

Where each part of it lives: `initial_state` (init), `update` (the update's
checks, mesh handling and skipping), `leaves` (momentum, grafting, block
stacks in and directions out), `blocks` (per block class: the factor
pipeline of `factors` and `refresh`, then `preconditioners`), `tensors`
(per-dimension factors of tensor leaves).
"""

from __future__ import annotations

import optax

from foam_optax._src import initial_state
from foam_optax._src import signatures
from foam_optax._src import update
from foam_optax._src.config import Config


@signatures.optimizer_function("foam")
def scale_by_foam(**arguments) -> optax.GradientTransformation:
  r"""Shampoo-family preconditioning with FOAM's adaptive damping and refresh.

  For each block ``G`` (``m x n``) of each parameter, with ``t`` the 1-based
  step:

  .. math::

    L_t = b_2 L_{t-1} + (1-b_2) G G^\top, \quad
    R_t = b_2 R_{t-1} + (1-b_2) G^\top G, \quad
    A_t = L_t / (1 - b_2^t)

    M_t = (b_1 M_{t-1} + (1-b_1) G_t) / (1 - b_1^t), \qquad
    P_t = X_L M_t X_R, \quad X = Q\,\mathrm{diag}((D+\varepsilon)^{-1/p})\,Q^\top

  ``(Q, D)`` is a cached eigendecomposition of each factor and ``ε`` its
  damping. On a check step (``t == s0`` or ``t % f == 0``), FOAM measures the
  staleness of ``Q`` with ``h = ‖(QᵀA_tQ − D) ⊘ √(SSᵀ)‖_F · α / p``
  (``S = D + ε``, ``α = max(w)/‖w‖₂``, ``w = S^{-1/p}``), proposes
  ``ε_n = max(ε0, ε·h/τ)``, and recomputes ``eigh(A_t)`` only when ``ε_n``
  would exceed ``max_epsilon``. Each block's step gets the norm of a grafted
  Adam step. Under `jax.jit` the skipped eigendecompositions are not executed.

  Args:
    <<arguments>>

  Returns:
    An `optax.GradientTransformation` producing the preconditioned direction
    (no learning rate, no sign flip), in each parameter's dtype. A state
    initialised under a device mesh (``jax.set_mesh``, or parameters sharded
    on it) divides the factors among the devices: see `state_sharding`.

  Example:
    >>> import jax.numpy as jnp, optax, foam_optax as fo
    >>> tx = optax.chain(fo.scale_by_foam(), optax.scale_by_learning_rate(1e-3))
    >>> state = tx.init({'w': jnp.ones((4, 3))})

  References:
    The FOAM paper, ICML 2026: frequency and operator-error based adaptive
    damping for Shampoo. arXiv:2606.02365.

    Gupta, Koren and Singer, Shampoo: Preconditioned Stochastic Tensor
    Optimization, ICML 2018. arXiv:1802.09568.

    Anil, Gupta, Koren, Regan and Singer, Scalable Second Order Optimization
    for Deep Learning, 2020. arXiv:2002.09018.

    Shi et al., A Distributed Data-Parallel PyTorch Implementation of the
    Distributed Shampoo Optimizer for Training Neural Networks At-Scale,
    2023. arXiv:2309.06497 (storage dtypes, pseudo-inverse).
  """
  return from_config(signatures.config_for("foam", arguments))


def from_config(cfg: Config) -> optax.GradientTransformation:
  """The transformation for an already validated `Config`."""

  def init_fn(params):
    return initial_state.init(params, cfg)

  def update_fn(updates, state, params=None, *, microbatch_grads=None,
                **extra_args):
    del extra_args   # optax's convention: the chain's others, unused here
    return update.update(updates, state, cfg, params, microbatch_grads)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
