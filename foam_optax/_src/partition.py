"""Route each parameter to a Shampoo-family or to a diagonal optimizer.

Kronecker factors pay off on weight matrices and kernels. Scalars, vectors,
biases and norm parameters (whatever their shape: an attention bias of shape
``(heads, head_dim)`` is still a bias) and embedding tables (huge vocabulary
side, sparse rows) are usually better served by AdamW. `partition` builds
that split with `optax.partition`:

>>> import optax, foam_optax as fo
>>> tx = fo.partition(fo.foam(1e-3), optax.adamw(1e-3))
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

from foam_optax._src.nnx import is_variable, plain_arrays
from foam_optax._src.skipping import skip_nonfinite

PRECONDITION = "precondition"
DIAGONAL = "diagonal"
BIAS_AND_NORM_PATTERN = r"bias|norm|scale"
EMBEDDING_PATTERN = r"embed"


def _compile(pattern):
  return re.compile(pattern, re.IGNORECASE) if pattern else None


def precondition_labels(params,
                        bias_and_norm_pattern: str = BIAS_AND_NORM_PATTERN,
                        embedding_pattern: str = EMBEDDING_PATTERN) -> Any:
  """`'precondition'` or `'diagonal'` for each leaf of `params`.

  A leaf is `'diagonal'` when any of these holds, else `'precondition'`:

  * it has fewer than two dimensions larger than 1 (scalars, vectors);
  * its path (as `jax.tree_util.keystr`) matches `bias_and_norm_pattern`
    (biases and normalisation parameters of any shape; the default matches
    ``bias``, ``norm`` and ``scale``, as in Flax's ``LayerNorm``,
    ``RMSNorm`` and ``BatchNorm``);
  * its path matches `embedding_pattern` (embedding tables).

  Patterns are regular expressions searched case-insensitively; an empty
  one matches nothing. A Flax NNX variable (``nnx.Param``) gets one label,
  in place of the variable, as `optax.partition` needs.

  Example:
    >>> import jax.numpy as jnp, foam_optax as fo
    >>> fo.precondition_labels({'attn': {'kernel': jnp.zeros((8, 2, 4)),
    ...                                  'bias': jnp.zeros((2, 4))}})
    {'attn': {'bias': 'diagonal', 'kernel': 'precondition'}}
  """
  bias_and_norm = _compile(bias_and_norm_pattern)
  embedding = _compile(embedding_pattern)

  def label(path, leaf):
    big_dims = sum(d > 1 for d in getattr(plain_arrays(leaf), "shape", ()))
    name = jax.tree_util.keystr(path)
    by_name = any(p is not None and p.search(name)
                  for p in (bias_and_norm, embedding))
    return DIAGONAL if big_dims < 2 or by_name else PRECONDITION

  return jax.tree_util.tree_map_with_path(label, params, is_leaf=is_variable)


def partition(preconditioned: optax.GradientTransformation,
              diagonal: optax.GradientTransformation,
              bias_and_norm_pattern: str = BIAS_AND_NORM_PATTERN,
              embedding_pattern: str = EMBEDDING_PATTERN
              ) -> optax.GradientTransformation:
  """`optax.partition` of weight matrices and kernels to `preconditioned`,
  the rest (scalars, vectors, biases, norm parameters, embeddings; see
  `precondition_labels`) to `diagonal`.

  Both transformations should include their learning rate (e.g. `fo.foam`
  and `optax.adamw`). `fo.stats` works on the resulting state. A step with a
  non-finite gradient in any leaf is skipped for both parts
  (`skip_nonfinite`).

  Extra arguments of ``update`` reach both parts, as in `optax.partition`.
  Per-microbatch gradients (``microbatch_grads=``, for a bias-corrected
  part such as ``fo.foam(lr, bias_correction='cross_fit')`` or
  `fo.bias_corrected_adamw`) are taken by each part for its own leaves;
  when neither part uses them, ``update`` warns.
  """
  return skip_nonfinite(optax.partition(
      {PRECONDITION: preconditioned, DIAGONAL: diagonal},
      lambda params: precondition_labels(params, bias_and_norm_pattern,
                                         embedding_pattern)))
