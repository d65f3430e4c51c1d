"""μP learning-rate multipliers: tune at a small width, train at a large one.

`mup_multipliers` compares every parameter with the same parameter of a base
(narrow) model and returns the factor by which the learning rate tuned on the
base model must be multiplied at the new width; `scale_by_mup` applies them
inside an `optax.chain`. The rule is the official ``assign_lr`` of Qiu, Chen
et al., *Hyperparameter Transfer Enables Consistent Gains of
Matrix-Preconditioned Optimizers Across Scales* (NeurIPS 2025,
arXiv:2512.05620), code charliezchen/scaling-matrix-preconditioning at
commit 5a02d4f, ``train.py``; the rules for ASGO and for SOAP driven by
FOAM's controller are derived in `mup_multipliers`' docstring.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Optional, get_args

import jax
import numpy as np
import optax

from foam_optax._src import layout
from foam_optax._src import validation

Optimizer = Literal["adam", "grafted", "shampoo", "soap", "muon", "asgo", "sgd"]
PathPredicate = Optional[Callable[[str], bool]]


def _leaf_shape(leaf) -> tuple:
  return tuple(int(d) for d in (leaf.shape if hasattr(leaf, "shape")
                                else np.shape(leaf)))


def _differing_leaf(flat, base_flat, labels=("params", "base_params")) -> str:
  """The first leaf path that one tree (named by `labels`) has and the
  other lacks."""
  names = [jax.tree_util.keystr(path) for path, _ in flat]
  base_names = [jax.tree_util.keystr(path) for path, _ in base_flat]
  for name in names:
    if name not in base_names:
      return f"{name} (in {labels[0]}, not in {labels[1]})"
  for name in base_names:
    if name not in names:
      return f"{name} (in {labels[1]}, not in {labels[0]})"
  # Same leaf paths, different containers (e.g. a dict against a tuple).
  for name, base_name in zip(names, base_names):
    if name != base_name:
      return f"{name} (in {labels[0]}) / {base_name} (in {labels[1]})"
  return names[0] if names else "<root>"


def _fan_view(shape: tuple, dims) -> tuple:
  """The ``(fan_in, fan_out)`` shape of a leaf under its dimension numbers
  (the reduction axes merged, then the output axes; batch axes, such as
  stacked layers, left out), or its flat size as a vector when either side
  has no axis (``DimensionNumbers((), ())``: no matrix)."""
  _, _, view = layout.dimension_numbers_transpose(shape, dims)
  axes = lambda axis: (axis,) if isinstance(axis, int) else tuple(axis)
  if not (axes(dims.reduction_axis) and axes(dims.output_axis)):
    return (math.prod(shape),)
  return view


def _matrix_multiplier(name, shape, base_shape, *, optimizer, block_size,
                       max_precond_dim, depth, exponent) -> float:
  """The multiplier of one (fan_in, fan_out) leaf; see `mup_multipliers`."""
  (base_in, base_out), (fan_in, fan_out) = base_shape, shape
  r_in, r_out = fan_in / base_in, fan_out / base_out
  if optimizer in ("adam", "grafted", "asgo"):
    return 1.0 / r_in
  if optimizer == "muon":
    return math.sqrt(r_out / r_in)
  if optimizer == "sgd":
    return r_out / r_in * depth

  limit = math.inf if max_precond_dim is None else max_precond_dim
  sides = {}
  for side, dim, base_dim in (("input", fan_in, base_in),
                              ("output", fan_out, base_out)):
    active, base_active = dim <= limit, base_dim <= limit
    if active != base_active:
      raise ValueError(
          f"mup_multipliers: leaf {name}: its {side} side ({dim}, base "
          f"{base_dim}) is preconditioned at one width and not at the other "
          f"(max_precond_dim={max_precond_dim}); the multiplier is undefined "
          f"across that change (the official code asserts the same).")
    blocks = math.ceil(dim / block_size) if block_size and active else 1
    base_blocks = (math.ceil(base_dim / block_size) if block_size and active
                   else 1)
    sides[side] = (active, blocks / base_blocks)
  (in_active, n_in), (out_active, n_out) = sides["input"], sides["output"]
  if not (in_active or out_active):
    raise ValueError(
        f"mup_multipliers: leaf {name} of shape {shape} has no preconditioned "
        f"side (both exceed max_precond_dim={max_precond_dim}); its update is "
        f"the diagonal one: compute its multiplier with optimizer='adam'.")
  if optimizer == "shampoo":
    per_side = 1.0 / exponent
    power = 2 * per_side if in_active and out_active else per_side
    return (depth ** (1 - 2 * power) * (r_out / r_in) ** (1 - power)
            * (n_in * n_out) ** -power)
  # SOAP, whichever controller refreshes its eigenbasis.
  if in_active and out_active:
    return math.sqrt(r_out / r_in) / math.sqrt(n_in * n_out)
  if in_active:
    return 1.0 / math.sqrt(r_in * n_in)
  return math.sqrt(r_out / n_out) / r_in


def mup_multipliers(params, base_params, *, optimizer: Optimizer,
                    block_size: Optional[int] = None,
                    max_precond_dim: Optional[int] = None,
                    depth_ratio: float = 1.0,
                    embedding: PathPredicate = None,
                    readout: PathPredicate = None,
                    exponent: float = 4,
                    weight_dimension_numbers: Optional[Any] = None) -> Any:
  r"""μP learning-rate multipliers of every parameter against a base model.

  A learning rate tuned on the base model transfers to `params`' widths when
  each leaf's update is multiplied by the returned factor (`scale_by_mup`).
  A matrix leaf is read as ``(fan_in, fan_out)``, Flax's kernel layout (an
  ``nnx.Embed`` table is ``(vocabulary, features)``); a leaf of another
  rank through its `weight_dimension_numbers` (for Flax NNX layers,
  ``fo.nnx_dimension_numbers(model)`` gives them, the rank-3 kernels of
  ``nnx.MultiHeadAttention`` included); with
  :math:`r_\mathrm{in} = d_\mathrm{in}/d_\mathrm{in}^\mathrm{base}`,
  :math:`r_\mathrm{out} = d_\mathrm{out}/d_\mathrm{out}^\mathrm{base}`,
  block-count ratios :math:`n = \lceil d/b\rceil / \lceil d^\mathrm{base}/b\rceil`
  (1 without `block_size`, and on a side longer than `max_precond_dim`) and
  the depth ratio :math:`N`:

  ==========================================  ==============================================================================
  `optimizer`                                 multiplier
  ==========================================  ==============================================================================
  ``'adam'``, ``'grafted'``, ``'asgo'``       :math:`1/r_\mathrm{in}`
  ``'muon'``                                  :math:`\sqrt{r_\mathrm{out}/r_\mathrm{in}}`
  ``'shampoo'`` (exponent :math:`p`)          :math:`N^{1-2E} (r_\mathrm{out}/r_\mathrm{in})^{1-E} (n_\mathrm{in} n_\mathrm{out})^{-E}`, :math:`E = 2/p` (both sides) or :math:`1/p` (one side)
  ``'soap'``, both sides preconditioned       :math:`\sqrt{r_\mathrm{out}/r_\mathrm{in}}\,(n_\mathrm{in} n_\mathrm{out})^{-1/2}`
  ``'soap'``, input side only                 :math:`(r_\mathrm{in} n_\mathrm{in})^{-1/2}`
  ``'soap'``, output side only                :math:`\sqrt{r_\mathrm{out}/n_\mathrm{out}}/r_\mathrm{in}`
  ``'sgd'``                                   :math:`(r_\mathrm{out}/r_\mathrm{in})\,N`
  ==========================================  ==============================================================================

  Each is the factor that keeps the update's spectral norm at
  :math:`\Theta(\sqrt{d_\mathrm{out}/d_\mathrm{in}})`, the condition for
  maximal feature learning (Yang, Simon & Bernstein, 2023), given how the
  optimizer's raw update scales with width on a minibatch gradient of
  bounded rank. ``'grafted'`` is Shampoo or FOAM with Adam grafting
  (`foam`, `shampoo` with their defaults): the grafted update has Adam's
  norm per block, so it takes Adam's rule. ``'shampoo'`` is ungrafted
  Shampoo (``grafting='none'``) with inverse root :math:`1/p` per side;
  `exponent` is that :math:`p`: 4 (the default) is classic Shampoo (the
  official code's optimizer ``'shampoo'``); `shampoo`'s own default
  ``exponent=2`` is its ``'shampoo2'``, so pass ``exponent=2`` with it.
  ``'muon'`` is
  for the orthogonalised update itself (spectral norm 1), as
  ``optax.contrib.scale_by_muon`` and the official code return it;
  ``optax.contrib.muon`` already multiplies that by
  :math:`\sqrt{\max(1, d_\mathrm{out}/d_\mathrm{in})}`, so with it divide
  each matrix's multiplier by the ratio of that factor to the base model's.

  **The block-count factor of** ``'shampoo'``. With blocks, the factor
  :math:`(n_\mathrm{in} n_\mathrm{out})^{-E}` divides out what blocking
  adds to the update: each block of an ungrafted Shampoo update (``p =
  4``) of a gradient of rank :math:`k` at most the block size is a partial
  isometry, and for rank 1 the blocks tile one rank-1 matrix
  :math:`\hat u \hat v^\top` with :math:`\|\hat u\|^2 = n_\mathrm{in}`,
  :math:`\|\hat v\|^2 = n_\mathrm{out}`, so the update's spectral norm is
  :math:`\sqrt{n_\mathrm{in} n_\mathrm{out}}` where one block's is 1
  (`tests/test_mup.py` measures it for ranks 1 and 4 across widths: with
  the multiplier the spectral norm stays at
  :math:`\Theta(\sqrt{d_\mathrm{out}/d_\mathrm{in}})`, without the factor
  it grows as :math:`\sqrt{n_\mathrm{in} n_\mathrm{out}}`). The factor is
  that of ``assign_lr`` at commit 5a02d4f, which this rule follows (the
  tests compare every leaf with a line-by-line port of it); the official
  ``train.py`` at commit 2116884 has none: there ``'shampoo'`` is
  :math:`\sqrt{r_\mathrm{out}/r_\mathrm{in}}` and ``'shampoo2'``
  :math:`1/N` (one side preconditioned or both), and the block counts only
  scale its Shampoo's ε. This rule departs from that version in the block
  factor and, with one preconditioned side, in :math:`E = 1/p`. It agrees
  with 5a02d4f on every matrix leaf that code accepts (it asserts for
  every optimizer that no side crosses `max_precond_dim`; here only
  ``'shampoo'`` and ``'soap'``, whose rules depend on it, refuse that).

  **Derived rules** (the paper has neither optimizer):

  * ``'soap'`` covers SOAP driven by any controller, FOAM's included
    (``soap(controller='foam')``): a controller only decides when the
    eigenbasis is refreshed; the update is always Adam in the current
    basis, whose width scaling is SOAP's.
  * ``'asgo'``: ASGO (arXiv:2503.20762) whitens the momentum :math:`M` on
    its smaller side, :math:`U = V^{-1/2} M`, and rescales to
    :math:`\|U\|_F = 0.2\sqrt{d_\mathrm{in} d_\mathrm{out}}` (RMS 0.2). On a
    gradient of bounded rank :math:`k` (one minibatch), :math:`U` keeps
    that rank, so :math:`\|U\|_2 \ge \|U\|_F/\sqrt{k} \propto
    \sqrt{d_\mathrm{in} d_\mathrm{out}}`, Adam's scaling, and the spectral
    condition asks for :math:`1/r_\mathrm{in}`. The rescaling removes the
    preconditioner's own scale, so blocking, `max_precond_dim` and which
    side is the smaller do not enter. `tests/test_mup.py` checks it by
    measurement: the feature change :math:`\|\Delta h\|` after one ASGO
    step stays flat across widths with the multiplier and grows with width
    without it.

  **Depth.** `depth_ratio` (:math:`N`, depth over the base depth) enters
  only ``'shampoo'`` and ``'sgd'``, as in the official code, and never the
  leaves that `embedding` or `readout` select: their vocabulary side does
  not grow with the model, and the shape rule above already gives their
  width scaling (ratio 1 on that side). That exemption is all `embedding`
  and `readout` do: they change a multiplier only for ``'sgd'`` and
  ``'shampoo'`` with ``depth_ratio != 1`` (and for ``'shampoo'`` not where
  :math:`N^{1-2E} = 1`, ``exponent=4`` with both sides preconditioned);
  with any other rule, or at the base depth, they may be left out.

  **Scalars and vectors** (biases, norm gains) are updated by Adam (or the
  grafting Adam) in every optimizer here, and ``optax.contrib.muon`` routes
  them to Adam too: they are ``(1, n)`` matrices under Adam's rule,
  multiplier 1; under ``'sgd'``, :math:`r_\mathrm{out} N`.

  **Epsilon.** Under μP a hidden matrix's gradient entries shrink like
  :math:`1/r_\mathrm{out}`; the official code divides Adam's ε by
  :math:`r_\mathrm{out} N` to follow them. The optimizers here take one
  global ε: keep it far below the gradients' RMS at the largest width (the
  defaults, 1e-8 and 1e-9, are).

  **Weight decay** independent of the learning rate and scaled as
  ``1/width``, the official ``wdxD / D``, with optax's own pieces::

    tx = optax.chain(
        fo.scale_by_foam(),                     # any scale_by_* direction
        fo.scale_by_mup(multipliers),           # μP
        optax.scale(learning_rate),             # tuned at the base width
        optax.add_decayed_weights(wd_x_width / width, mask),
        optax.scale_by_schedule(schedule),      # peak 1: warmup and decay
        optax.scale(-1.0))

  Each step moves a parameter by ``-schedule(t) * (learning_rate * m * u +
  wd * p)``: the decay does not move with the learning rate (the product
  ``learning_rate * weight_decay`` of `foam`'s ``weight_decay`` would).

  Args:
    params: the parameters (or their shapes, e.g. from `jax.eval_shape`)
      at the target width.
    base_params: the same tree at the base width, where the learning rate
      was tuned.
    optimizer: the update rule: ``'adam'``, ``'grafted'``, ``'shampoo'``,
      ``'soap'``, ``'muon'``, ``'asgo'`` or ``'sgd'``.
    block_size: the optimizer's block size (None: no blocking).
    max_precond_dim: the optimizer's ``max_precond_dim`` (None: no limit).
      Used by ``'shampoo'`` and ``'soap'``; the other rules do not depend on
      which sides are preconditioned.
    depth_ratio: number of residual blocks over the base model's.
    embedding: predicate on a leaf's path (`jax.tree_util.keystr`) that
      selects embedding tables, exempt from the depth factor; None selects
      none (see **Depth**: it matters only for ``'shampoo'`` and ``'sgd'``
      with ``depth_ratio != 1``).
    readout: the same for the output layer.
    exponent: ``'shampoo'``'s :math:`p`, the inverse root per side.
    weight_dimension_numbers: None, or as the optimizers' argument of that
      name: a pytree (a prefix of `params`) of `DimensionNumbers` or None per
      leaf, or a callable of the parameters returning one. A leaf with
      dimension numbers is read as the ``(fan_in, fan_out)`` matrix of its
      reduction axes by its output axes (other axes, such as stacked
      layers, do not enter); ``DimensionNumbers((), ())`` reads it as a
      vector. ``fo.nnx_dimension_numbers(model)`` builds it for Flax NNX
      layers. The same tree serves both widths.

  Returns:
    A tree with `params`' structure of Python floats, 1.0 everywhere when
    `params` has the base shapes and `depth_ratio` is 1.

  Raises:
    ValueError: naming the leaf when the two trees differ in structure, a
      leaf's rank differs from its base's, has rank above 2 without
      dimension numbers (give them in `weight_dimension_numbers`, or pass
      its ``(fan_in, fan_out)`` shape as a `jax.ShapeDtypeStruct`) or has a
      zero dimension; for ``'shampoo'`` and ``'soap'`` when a side is
      preconditioned at one width and not at the other (it crosses
      `max_precond_dim`), or at neither; and naming the argument for an
      unknown `optimizer` or an invalid setting.

  Example:
    >>> import jax.numpy as jnp, foam_optax as fo
    >>> mlp = lambda width: {'hidden': jnp.zeros((width, width)),
    ...                      'readout': jnp.zeros((width, 10))}
    >>> fo.mup_multipliers(mlp(1024), mlp(128), optimizer='grafted')
    {'hidden': 0.125, 'readout': 0.125}
    >>> fo.mup_multipliers(mlp(1024), mlp(128), optimizer='muon')
    {'hidden': 1.0, 'readout': 0.3535533905932738}

  References:
    S. Qiu, Z. Chen, H. Ding, S. Kakade, et al. *Hyperparameter Transfer
    Enables Consistent Gains of Matrix-Preconditioned Optimizers Across
    Scales.* NeurIPS 2025. arXiv:2512.05620.
    G. Yang, J. B. Simon, J. Bernstein. *A Spectral Condition for Feature
    Learning.* 2023. arXiv:2310.17813.
    G. Yang, E. J. Hu, et al. *Tensor Programs V: Tuning Large Neural
    Networks via Zero-Shot Hyperparameter Transfer.* 2022. arXiv:2203.03466.
  """
  if optimizer not in get_args(Optimizer):
    raise ValueError(f"optimizer must be one of {get_args(Optimizer)}, got "
                     f"{optimizer!r}.")
  for name, value in (("block_size", block_size),
                      ("max_precond_dim", max_precond_dim)):
    validation.python_integer(1, allow_none=True)(name, value)
  validation.POSITIVE("depth_ratio", depth_ratio)
  validation.POSITIVE("exponent", exponent)
  for name, predicate in (("embedding", embedding), ("readout", readout)):
    if predicate is not None and not callable(predicate):
      raise ValueError(f"{name} must be None or a predicate on the leaf's "
                       f"path, got {predicate!r}.")

  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  base_flat, base_treedef = jax.tree_util.tree_flatten_with_path(base_params)
  if treedef != base_treedef:
    raise ValueError("mup_multipliers: params and base_params differ in "
                     f"structure at leaf {_differing_leaf(flat, base_flat)}.")
  leaf_numbers = layout.dimension_numbers(weight_dimension_numbers,
                                                 params)

  multipliers = []
  for (path, leaf), (_, base_leaf), dims in zip(flat, base_flat,
                                                leaf_numbers):
    name = jax.tree_util.keystr(path)
    shape, base_shape = _leaf_shape(leaf), _leaf_shape(base_leaf)
    if len(shape) != len(base_shape):
      raise ValueError(f"mup_multipliers: leaf {name} has rank {len(shape)} "
                       f"{shape} but its base has rank {len(base_shape)} "
                       f"{base_shape}.")
    if dims is not None:
      shape, base_shape = _fan_view(shape, dims), _fan_view(base_shape, dims)
    elif len(shape) > 2:
      raise ValueError(
          f"mup_multipliers: leaf {name} has rank {len(shape)} {shape}; its "
          f"fan-in and fan-out are ambiguous: give its axes in "
          f"weight_dimension_numbers (fo.nnx_dimension_numbers(model) does "
          f"for Flax NNX layers), or pass its (fan_in, fan_out) shape as a "
          f"jax.ShapeDtypeStruct in both trees.")
    if 0 in base_shape or 0 in shape:
      which = "base " if 0 in base_shape else ""
      raise ValueError(f"mup_multipliers: leaf {name} has a zero {which}"
                       f"dimension: shape {shape}, base {base_shape}.")
    edge = any(p is not None and p(name) for p in (embedding, readout))
    depth = 1.0 if edge else float(depth_ratio)
    if len(shape) < 2:
      # Updated by Adam (or grafting Adam) everywhere: a (1, n) matrix.
      size, base_size = math.prod(shape), math.prod(base_shape)
      multiplier = size / base_size * depth if optimizer == "sgd" else 1.0
    else:
      multiplier = _matrix_multiplier(
          name, shape, base_shape, optimizer=optimizer, block_size=block_size,
          max_precond_dim=max_precond_dim, depth=depth, exponent=exponent)
    multipliers.append(float(multiplier))
  return jax.tree_util.tree_unflatten(treedef, multipliers)


def _check_multiplier(path, value) -> None:
  name = f"scale_by_mup: multiplier {jax.tree_util.keystr(path)}"
  validation.numeric(name, value)
  known = validation.known(value)   # None when traced
  if known is not None and not (math.isfinite(known) and known > 0):
    raise ValueError(f"{name} must be positive and finite, got {value!r}.")


def _unmatched_leaf(multipliers, params) -> Optional[str]:
  """None when `multipliers`' structure is a prefix of `params`' (one
  multiplier per leaf, or per wrapped leaf such as an ``nnx.Variable``),
  else the first leaf where they part."""
  try:
    jax.tree_util.tree_structure(multipliers).flatten_up_to(params)
    return None
  except (ValueError, TypeError):
    pass
  names = [jax.tree_util.keystr(p)
           for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  m_names = [jax.tree_util.keystr(p)
             for p, _ in jax.tree_util.tree_flatten_with_path(multipliers)[0]]
  for name in names:
    if not any(name.startswith(m) for m in m_names):
      return f"{name} (in params, not in multipliers)"
  for m in m_names:
    if not any(name.startswith(m) for name in names):
      return f"{m} (in multipliers, not in params)"
  return m_names[0] if m_names else "<root>"


def scale_by_mup(multipliers) -> optax.GradientTransformation:
  r"""Multiplies each leaf's update by its μP learning-rate multiplier.

  .. math:: u_\ell \leftarrow m_\ell \, u_\ell

  with :math:`m_\ell` from `mup_multipliers`. Place it after the direction
  (``scale_by_*``) and before the learning rate, so that one learning rate
  tuned at the base width serves every width; the weight-decay recipe of
  `mup_multipliers` shows the whole chain. The multipliers are Python
  floats or scalar arrays (traced ones too, so a jitted sweep may pass them
  as arguments).

  Args:
    multipliers: a tree with the parameters' structure of positive numbers
      (for Flax NNX, from ``nnx.as_pure`` states, as ``nnx.Optimizer``
      passes them).

  Returns:
    An `optax.GradientTransformation` with an empty state; updates keep
    their dtype.

  Raises:
    ValueError: at construction naming a multiplier that is not a positive
      finite number; in ``init`` naming the first leaf where the parameters'
      structure differs from `multipliers'` (a parameter may be a wrapper
      of its leaf, such as an ``nnx.Param``).

  Example:
    >>> import jax.numpy as jnp, optax, foam_optax as fo
    >>> params = {'w': jnp.ones((512, 512))}
    >>> base = {'w': jnp.ones((128, 128))}
    >>> tx = optax.chain(optax.scale_by_adam(), fo.scale_by_mup(
    ...     fo.mup_multipliers(params, base, optimizer='adam')),
    ...     optax.scale(-1e-2))
    >>> updates, _ = tx.update(params, tx.init(params))
    >>> round(float(updates['w'][0, 0]), 6)   # Adam's ±1, times 1/4 and 1e-2
    -0.0025

  References:
    S. Qiu, Z. Chen, H. Ding, S. Kakade, et al. *Hyperparameter Transfer
    Enables Consistent Gains of Matrix-Preconditioned Optimizers Across
    Scales.* NeurIPS 2025. arXiv:2512.05620.
  """
  jax.tree_util.tree_map_with_path(_check_multiplier, multipliers)

  def init_fn(params):
    unmatched = _unmatched_leaf(multipliers, params)
    if unmatched is not None:
      raise ValueError("scale_by_mup: the parameters and the multipliers "
                       f"differ in structure at leaf {unmatched}.")
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    scale = lambda m, subtree: jax.tree.map(
        lambda u: (u * m).astype(u.dtype), subtree)
    return jax.tree.map(scale, multipliers, updates), state

  return optax.GradientTransformation(init_fn, update_fn)
