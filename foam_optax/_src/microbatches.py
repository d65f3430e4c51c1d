"""Per-microbatch gradients: computing them, checking what an optimizer is
handed, and saying so when nothing uses them."""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from foam_optax._src import validation
from foam_optax._src.nnx import plain_arrays

# What every warning about unused microbatch gradients starts with, for
# `warnings.filterwarnings("ignore", IGNORED)`.
IGNORED = "foam_optax: microbatch_grads ignored"

# Inside `tracking`: the list that records the uses of the microbatch
# gradients during one optimizer update.
_USES: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar(
    "foam_optax_microbatch_uses", default=None)


def _warn_ignored(subject: str) -> None:
  # Point at the user's frame: the first outside this package, JAX, optax
  # and contextlib (the update may run deep inside jit and chains).
  library = tuple(os.path.dirname(str(m.__file__)) for m in (jax, optax)) + (
      os.path.dirname(os.path.dirname(__file__)), contextlib.__file__)
  frame, level = sys._getframe(0), 1
  while frame.f_back is not None and frame.f_code.co_filename.startswith(
      library):
    frame, level = frame.f_back, level + 1
  warnings.warn(
      f"{IGNORED}: update() was given microbatch_grads, but {subject} "
      "(bias_correction='none' is the default of fo.foam, fo.shampoo and "
      "fo.soap). Pass bias_correction='cross_fit' or 'cross_fit_variance', "
      "or use fo.bias_corrected_adamw, for bias-corrected updates; otherwise "
      "stop passing them.", stacklevel=level)


@contextlib.contextmanager
def tracking(microbatch_grads):
  """Around a whole optimizer's update: warns (at trace time) when it was
  given `microbatch_grads` and no transformation inside used them.

  Optax passes extra arguments to every transformation of a chain, and
  those that have no use for them ignore them; so an optimizer may well
  hold parts that ignore the microbatch gradients (`fo.partition` with
  `optax.adamw`), and only the optimizer as a whole can tell that none used
  them. `skip_nonfinite`, which wraps every alias and `fo.partition`, opens
  this context; a nested one leaves the verdict to the outermost.
  """
  if microbatch_grads is None or _USES.get() is not None:
    yield
    return
  uses = []
  token = _USES.set(uses)
  try:
    yield
  finally:
    _USES.reset(token)
  if not uses:
    _warn_ignored("no transformation of this optimizer uses them")


def ignored(microbatch_grads, who: str) -> None:
  """Called by a transformation that takes `microbatch_grads` but has no use
  for them: warns, unless an enclosing `tracking` decides for the whole
  optimizer."""
  if microbatch_grads is not None and _USES.get() is None:
    _warn_ignored(f"{who} does not use them")


def microbatch_grads(loss_fn, params, batch, num_microbatches: int):
  """The loss, mean gradient and per-microbatch gradients of a batch.

  The batch (any pytree of arrays whose leading axis is the example axis,
  of a length divisible by `num_microbatches`) is cut into
  `num_microbatches` consecutive microbatches, and ``jax.value_and_grad``
  of `loss_fn(params, microbatch)` is mapped over them with `jax.vmap`.
  Under `jax.jit` and on a mesh it runs as any `vmap`: a batch sharded
  over its example axis keeps the microbatch axis sharded.

  The per-microbatch gradients take ``num_microbatches`` times the memory
  of one gradient. They are for the optimizers that use them:
  `bias_corrected_adamw` and ``bias_correction='cross_fit'`` or
  ``'cross_fit_variance'`` of `foam`, `shampoo` and `soap`. As optax does
  with extra arguments, every transformation of a chain receives them and
  those without a use for them ignore them; an optimizer of this package
  (an alias, `partition`, `skip_nonfinite`) that uses them nowhere warns at
  trace time (a `UserWarning` starting ``foam_optax: microbatch_grads
  ignored``), since it then runs uncorrected.

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
  validation.python_integer(2)("num_microbatches", num_microbatches)
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


def _per_leaf(micro, grads):
  """The leaves of `micro` in `grads`' leaf order, or None when the trees do
  not match.

  `optax.masked`, `optax.partition` and `fo.partition` hand each inner
  transformation gradients in which the leaves it does not update are
  `optax.MaskedNode`, but pass extra arguments through unmasked: there
  `micro` may hold anything (the other part's arrays, or a MaskedNode).
  """
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  outer = jax.tree.structure(grads, is_leaf=is_masked)
  try:
    parts = outer.flatten_up_to(micro)
  except (ValueError, TypeError):
    return None
  leaves = [m for g, m in zip(jax.tree.leaves(grads, is_leaf=is_masked),
                              parts) if not is_masked(g)]
  if not all(jax.tree_util.treedef_is_leaf(jax.tree.structure(m))
             for m in leaves):
    return None
  return leaves


def checked(micro, grads, minimum: int, what: str, even: bool = False):
  """The per-leaf microbatch gradients (leading axis ``m``) in `grads`'
  leaf order, after checking them; errors at trace time name the problem.

  Where `grads` holds an `optax.MaskedNode` (the leaves a masked or
  partitioned transformation does not update) `micro` may hold anything.
  """
  if micro is None:
    raise ValueError(
        f"{what} needs the per-microbatch gradients: call "
        "update(grads, state, params, microbatch_grads=...) (see "
        "fo.microbatch_grads); without them it would run uncorrected.")
  uses = _USES.get()
  if uses is not None:
    uses.append(what)
  micro = plain_arrays(micro)
  leaves = _per_leaf(micro, grads)
  if leaves is None:
    raise ValueError(
        "microbatch_grads must have the gradients' tree structure; got "
        f"{str(jax.tree.structure(micro))[:300]} for gradients "
        f"{str(jax.tree.structure(grads))[:300]}.")
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
