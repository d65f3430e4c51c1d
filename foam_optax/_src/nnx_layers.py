"""Which axes of the common Flax NNX layers' parameters are fan-in and
fan-out, as `DimensionNumbers`."""

from __future__ import annotations

from typing import Any

import jax

from foam_optax._src.shaping import DimensionNumbers
from foam_optax._src.nnx import is_variable


def _trailing(ndim: int, num_in: int, num_out: int) -> DimensionNumbers:
  """The last `num_out` axes as the output, the `num_in` before them as the
  reduction; any leading axis (stacked layers of `nnx.vmap` / `nnx.scan`,
  ``LinearGeneral``'s ``batch_axis``) is a batch axis."""
  first = ndim - num_in - num_out
  return DimensionNumbers(tuple(range(first, first + num_in)),
                          tuple(range(first + num_in, ndim)))


# Not a matrix: a vector per layer (its slices, when layers are stacked).
_VECTOR = DimensionNumbers((), ())


def _layer_numbers(nnx, module) -> dict:
  """Per parameter name of one layer, its dimension numbers."""
  ndim = lambda name: len(getattr(module, name).shape)
  if isinstance(module, nnx.Embed):
    return {"embedding": _trailing(ndim("embedding"), 1, 1)}
  if isinstance(module, nnx.Linear):
    return {"kernel": _trailing(ndim("kernel"), 1, 1), "bias": _VECTOR}
  if isinstance(module, nnx.LinearGeneral):
    return {"kernel": _trailing(ndim("kernel"), len(module.in_features),
                                len(module.out_features)),
            "bias": _VECTOR}
  if isinstance(module, (nnx.Conv, nnx.ConvTranspose)):
    # (*kernel_size, in_features // groups, out_features)
    return {"kernel": _trailing(ndim("kernel"), len(module.kernel_size) + 1,
                                1),
            "bias": _VECTOR}
  if isinstance(module, (nnx.LayerNorm, nnx.RMSNorm, nnx.BatchNorm,
                         nnx.GroupNorm)):
    return {"scale": _VECTOR, "bias": _VECTOR}
  return {}


def _key_name(key):
  for field in ("key", "idx", "name"):
    if hasattr(key, field):
      return getattr(key, field)
  return key


def nnx_dimension_numbers(model, wrt: Any = None) -> Any:
  """The fan-in and fan-out axes of a Flax NNX model's weights.

  For the layers whose kernels are not ``(fan_in, fan_out)`` matrices, above
  all ``nnx.MultiHeadAttention`` (query, key and value kernels ``(in,
  heads, head_dim)``, output kernel ``(heads, head_dim, out)``), this reads
  each layer's own description of its axes:

  ====================================  ====================================
  layer                                 fan-in (reduction) / fan-out
                                        (output) axes
  ====================================  ====================================
  ``nnx.Linear``                        ``kernel`` ``(in, out)``: 0 / 1
  ``nnx.LinearGeneral`` (attention)     ``kernel``: its ``in_features``
                                        axes / its ``out_features`` axes
  ``nnx.Conv``, ``nnx.ConvTranspose``   ``kernel``: the window and input
                                        channels / the output channels
  ``nnx.Embed``                         ``embedding`` ``(vocabulary,
                                        features)``: 0 / 1
  ====================================  ====================================

  Any axis before those (layers stacked by ``nnx.vmap`` or ``nnx.scan``) is
  a batch axis. The biases of these layers and the scales and biases of
  ``nnx.LayerNorm``, ``nnx.RMSNorm``, ``nnx.BatchNorm`` and
  ``nnx.GroupNorm`` are vectors, whatever their shape (``(heads,
  head_dim)`` in attention, a leading layer axis when stacked):
  ``DimensionNumbers((), ())``, no matrix (Adam's multiplier in
  `mup_multipliers`, the grafting step alone in the optimizers). Every
  other parameter (``nnx.Einsum`` and other layers) gets None: the default
  reading of its shape.

  The tree serves as ``weight_dimension_numbers`` both of `mup_multipliers`
  (whose matrices are then ``(fan_in, fan_out)``, a rank-3 attention kernel
  included) and of the optimizers (`foam`, `shampoo`, `soap`, `asgo`,
  `dasgo`: each batch slice gets its own factors).

  Args:
    model: a Flax NNX module (an abstract one from ``nnx.eval_shape`` too).
    wrt: the variables the tree is for (an ``nnx.filterlib`` filter);
      None: ``nnx.Param``, as ``nnx.Optimizer`` and ``nnx.state(model,
      nnx.Param)``.

  Returns:
    A tree with the structure of ``nnx.state(model, wrt)``, holding
    `DimensionNumbers` or None in place of each variable: a prefix of that
    state and of its ``nnx.as_pure`` form.

  Example:
    >>> from flax import nnx
    >>> import foam_optax as fo
    >>> attention = nnx.MultiHeadAttention(
    ...     num_heads=2, in_features=16, decode=False, rngs=nnx.Rngs(0))
    >>> numbers = fo.nnx_dimension_numbers(attention)
    >>> numbers['query']['kernel'], numbers['out']['kernel']
    (DimensionNumbers(reduction_axis=(0,), output_axis=(1, 2)), DimensionNumbers(reduction_axis=(0, 1), output_axis=(2,)))
  """
  from flax import nnx   # Flax is not a dependency of the library

  numbers = {}
  for path, module in nnx.iter_graph(model):
    if isinstance(module, nnx.Module):
      for name, dims in _layer_numbers(nnx, module).items():
        numbers[tuple(path) + (name,)] = dims

  def lookup(path, _):
    return numbers.get(tuple(_key_name(k) for k in path))

  return jax.tree_util.tree_map_with_path(
      lookup, nnx.state(model, nnx.Param if wrt is None else wrt),
      is_leaf=is_variable)
