"""Explicit spectral normalisation of updates, the alternative to μP multipliers.

The official ``norm_by_spect`` of charliezchen/scaling-matrix-preconditioning
(commit 5a02d4f, ``utils.py``) as an optax transformation: each matrix
update is rescaled to spectral norm √(fan_out/fan_in), its top singular
value estimated by a power iteration warm-started from the previous step's
vector, and embedding updates are rescaled to RMS 1.
"""

from __future__ import annotations

import math
import typing
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from foam_optax._src import signatures
from foam_optax._src import validation

_TINY = 1e-30   # guards divisions by a zero norm


class ScaleBySpectralNormState(NamedTuple):
  """State of `scale_by_spectral_norm`.

  Attributes:
    count: updates so far (int32); the first `warmup_steps` run more
      power iterations.
    right_vectors: per leaf, the unit estimate of the update's top right
      singular vector, float32 of shape ``(fan_out,)``; shape ``(0,)`` for
      leaves not normalised by their spectral norm (embeddings, scalars,
      vectors).
  """

  count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]
  right_vectors: Any


def _top_singular_value(matrix, vector, iterations):
  """`iterations` power steps on ``matrixᵀ matrix`` from `vector`.

  Returns (estimate, new vector). The estimate ‖Aᵀy‖/‖y‖ with y = Av lies
  between ‖Av‖ (the official estimate) and σ_max, so it is never worse.
  A zero matrix keeps the previous vector.
  """
  def step(_, carry):
    v, _ = carry
    y = matrix @ v
    z = matrix.T @ y
    z_norm = jnp.linalg.norm(z)
    sigma = z_norm / jnp.maximum(jnp.linalg.norm(y), _TINY)
    return jnp.where(z_norm > _TINY, z / jnp.maximum(z_norm, _TINY), v), sigma

  vector, sigma = jax.lax.fori_loop(0, iterations, step,
                                    (vector, jnp.zeros((), matrix.dtype)))
  return sigma, vector


@signatures.public
def scale_by_spectral_norm(*, embedding: Optional[Callable[[str], bool]] = None,
                           power_iterations: int = 1,
                           warmup_steps: int = 50,
                           warmup_power_iterations: int = 5,
                           eps: float = 1e-10,
                           seed: int = 0) -> optax.GradientTransformation:
  r"""Rescales each matrix update to spectral norm √(fan_out / fan_in).

  For a matrix update :math:`U` of shape ``(fan_in, fan_out)``:

  .. math::

    U \leftarrow \sqrt{d_\mathrm{out}/d_\mathrm{in}}\;
      \frac{U}{\hat\sigma(U) + \epsilon},

  where :math:`\hat\sigma` estimates :math:`\|U\|_2` by power iteration on
  :math:`U^\top U`, warm-started from the previous step's vector (kept in
  the state): `warmup_power_iterations` steps per update for the first
  `warmup_steps` updates, then `power_iterations`. Updates of the leaves
  that `embedding` selects are rescaled to RMS 1 instead,
  :math:`U \leftarrow U / (\mathrm{RMS}(U) + \epsilon)`: their input is
  one-hot, so a Θ(1) feature change needs Θ(1) entries. Scalars and vectors
  pass unchanged.

  This is the paper's explicit normalisation, which replaces the μP
  multipliers (use it *instead of* `scale_by_mup`, with the same learning
  rate at every width): place it after the direction and before the
  learning rate, e.g. ``optax.chain(fo.scale_by_soap(),
  fo.scale_by_spectral_norm(), optax.scale(-learning_rate))``. One change
  from the official code: the estimate is :math:`\|U^\top y\|/\|y\|` with
  :math:`y = Uv`, never below the official :math:`\|Uv\|` and never above
  :math:`\|U\|_2`, at no extra cost. The estimate never exceeds
  :math:`\|U\|_2`, so a normalised update can only overshoot the target;
  warm-started, by well under 5% (`tests/test_spectral.py` checks it by SVD); the
  very first update, from a random vector, by more when the top two
  singular values are close.

  Args:
    embedding: predicate on a leaf's path (`jax.tree_util.keystr`) that
      selects embedding tables (RMS normalisation); None selects none.
    power_iterations: power steps per update after the warm-up.
    warmup_steps: number of first updates that use `warmup_power_iterations`.
    warmup_power_iterations: power steps per update during the warm-up.
    eps: added to the norm in each division.
    seed: seed of the random initial vectors.

  Returns:
    An `optax.GradientTransformation` whose state is a
    `ScaleBySpectralNormState`; its shapes and dtypes never change, and the
    updates keep their dtype. It works under `jax.jit`.

  Raises:
    ValueError: at construction for an invalid argument, naming it; in
      ``init`` naming a leaf of rank above 2 (reshape it to its
      ``(fan_in, fan_out)`` matrix first).

  Example:
    >>> import jax, jax.numpy as jnp, foam_optax as fo
    >>> tx = fo.scale_by_spectral_norm()
    >>> update = {'w': jax.random.normal(jax.random.PRNGKey(0), (64, 16))}
    >>> normalised, state = tx.update(update, tx.init(update))
    >>> s = float(jnp.linalg.norm(normalised['w'], ord=2))
    >>> abs(s - 0.5) < 0.025     # √(16 / 64)
    True

  References:
    G. Yang, J. B. Simon, J. Bernstein. *A Spectral Condition for Feature
    Learning.* 2023. arXiv:2310.17813; and, for its use with matrix
    preconditioners, the paper `mup_multipliers` follows (arXiv:2512.05620).
  """
  if embedding is not None and not callable(embedding):
    raise ValueError("embedding must be None or a predicate on the leaf's "
                     f"path, got {embedding!r}.")
  for name, value, minimum in (
      ("power_iterations", power_iterations, 1),
      ("warmup_steps", warmup_steps, 0),
      ("warmup_power_iterations", warmup_power_iterations, 1),
      ("seed", seed, 0)):
    validation.python_integer(minimum)(name, value)
  validation.NON_NEGATIVE("eps", eps)

  def is_embedding(path):
    return embedding is not None and bool(embedding(jax.tree_util.keystr(path)))

  def init_fn(params):
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), max(len(flat), 1))
    vectors = []
    for (path, leaf), key in zip(flat, keys):
      if jnp.ndim(leaf) > 2:
        raise ValueError(
            f"scale_by_spectral_norm: leaf {jax.tree_util.keystr(path)} has "
            f"rank {jnp.ndim(leaf)} {jnp.shape(leaf)}; reshape it to its (fan_in, "
            f"fan_out) matrix first.")
      if jnp.ndim(leaf) == 2 and not is_embedding(path):
        v = jax.random.normal(key, (jnp.shape(leaf)[1],), jnp.float32)
        vectors.append(v / jnp.maximum(jnp.linalg.norm(v), _TINY))
      else:
        vectors.append(jnp.zeros((0,), jnp.float32))
    return ScaleBySpectralNormState(
        count=jnp.zeros([], jnp.int32),
        right_vectors=jax.tree_util.tree_unflatten(treedef, vectors))

  def update_fn(updates, state, params=None):
    del params
    iterations = jnp.where(state.count < warmup_steps,
                           warmup_power_iterations, power_iterations)

    def normalise(path, update, vector):
      if jnp.ndim(update) < 2:
        return update, vector
      matrix = update.astype(jnp.float32)
      if is_embedding(path):
        rms = jnp.sqrt(jnp.mean(matrix ** 2))
        return (matrix / (rms + eps)).astype(update.dtype), vector
      sigma, vector = _top_singular_value(matrix, vector, iterations)
      fan_in, fan_out = update.shape
      scale = math.sqrt(fan_out / fan_in) / (sigma + eps)
      return (matrix * scale).astype(update.dtype), vector

    flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
    vectors = treedef.flatten_up_to(state.right_vectors)
    results = [normalise(path, u, v) for (path, u), v in zip(flat, vectors)]
    new_updates = jax.tree_util.tree_unflatten(treedef, [u for u, _ in results])
    vectors = jax.tree_util.tree_unflatten(treedef, [v for _, v in results])
    return new_updates, ScaleBySpectralNormState(
        count=typing.cast(jax.Array, optax.safe_int32_increment(state.count)),
        right_vectors=vectors)

  return optax.GradientTransformation(init_fn, update_fn)
