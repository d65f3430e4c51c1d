"""Per-microbatch gradients: computing them, and checking what an optimizer
is handed."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from foam_optax._src.state import plain_arrays


def microbatch_grads(loss_fn, params, batch, num_microbatches: int):
  """The loss, mean gradient and per-microbatch gradients of a batch.

  The batch (any pytree of arrays whose leading axis is the example axis,
  of a length divisible by `num_microbatches`) is cut into
  `num_microbatches` consecutive microbatches, and ``jax.value_and_grad``
  of `loss_fn(params, microbatch)` is mapped over them with `jax.vmap`.
  Under `jax.jit` and on a mesh it runs as any `vmap`: a batch sharded
  over its example axis keeps the microbatch axis sharded.

  The per-microbatch gradients take ``num_microbatches`` times the memory
  of one gradient.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss of a batch.
    params: the parameters.
    batch: a pytree of arrays with a leading example axis.
    num_microbatches: the number of microbatches, at least 2.

  Returns:
    ``(loss, grads, microbatch_grads)``: the mean of the microbatches'
    losses and gradients (the batch's, for a mean loss), and the gradients
    of each microbatch, leaves with a leading axis of length
    `num_microbatches`, for ``update(grads, state, params,
    microbatch_grads=...)``.

  Example:
    >>> # One changed line in a train step:
    >>> # loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    >>> loss, grads, micro = fo.microbatch_grads(loss_fn, params, batch, 8)
    >>> updates, state = tx.update(grads, state, params,
    ...                            microbatch_grads=micro)  # doctest: +SKIP
  """
  if isinstance(num_microbatches, bool) or not isinstance(
      num_microbatches, int) or num_microbatches < 2:
    raise ValueError("num_microbatches must be an integer >= 2, got "
                     f"{num_microbatches!r}.")
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None
           for x in jax.tree.leaves(batch)}
  size = next(iter(sizes)) if len(sizes) == 1 else None
  if size is None:
    raise ValueError("every leaf of the batch must have the same leading "
                     f"(example) axis; got lengths {sorted(sizes, key=str)}.")
  if size % num_microbatches:
    raise ValueError(f"a batch of {size} examples does not split into "
                     f"{num_microbatches} equal microbatches.")
  split = jax.tree.map(
      lambda x: x.reshape((num_microbatches, size // num_microbatches)
                          + x.shape[1:]), batch)
  losses, micro = jax.vmap(jax.value_and_grad(loss_fn),
                           in_axes=(None, 0))(params, split)
  return (jnp.mean(losses), jax.tree.map(lambda g: jnp.mean(g, axis=0), micro),
          micro)


def checked(micro, grads, minimum: int, what: str, even: bool = False):
  """The per-leaf microbatch gradients (leading axis ``m``) in `grads`'
  leaf order, after checking them; errors at trace time name the problem.
  """
  if micro is None:
    raise ValueError(
        f"{what} needs the per-microbatch gradients: call "
        "update(grads, state, params, microbatch_grads=...) (see "
        "fo.microbatch_grads); without them it would run uncorrected.")
  micro = plain_arrays(micro)
  if jax.tree.structure(micro) != jax.tree.structure(grads):
    raise ValueError(
        "microbatch_grads must have the gradients' tree structure; got "
        f"{str(jax.tree.structure(micro))[:300]} for gradients "
        f"{str(jax.tree.structure(grads))[:300]}.")
  leaves = jax.tree.leaves(micro)
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(grads)[0]]
  counts = set()
  for path, m, g in zip(paths, leaves, jax.tree.leaves(grads)):
    if jnp.shape(m)[1:] != jnp.shape(g) or jnp.ndim(m) != jnp.ndim(g) + 1:
      raise ValueError(
          f"microbatch_grads{path} has shape {jnp.shape(m)}; it must be the "
          f"gradient's shape {jnp.shape(g)} after a leading microbatch axis.")
    counts.add(jnp.shape(m)[0])
  if len(counts) > 1:
    raise ValueError("every leaf of microbatch_grads must have the same "
                     f"number of microbatches; got {sorted(counts)}.")
  (count,) = counts or {minimum}
  if count < minimum or (even and count % 2):
    parity = ", an even number," if even else ""
    raise ValueError(f"{what} needs at least {minimum}{parity} "
                     f"microbatches; got {count}.")
  return leaves
