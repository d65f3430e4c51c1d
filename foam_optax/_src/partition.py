"""Route each parameter to a Shampoo-family or to a diagonal optimizer.

Kronecker factors pay off on matrices and tensors. Scalars, vectors (biases,
norm scales) and embedding tables (huge vocabulary side, sparse rows) are
usually better served by AdamW. `partition` builds that split with
`optax.partition`:

>>> import optax, foam_optax as fo
>>> tx = fo.partition(fo.foam(1e-3), optax.adamw(1e-3))
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

from foam_optax._src.alias import skip_nonfinite

PRECONDITION = "precondition"
DIAGONAL = "diagonal"


def precondition_labels(params, embedding_pattern: str = "embed") -> Any:
  """`'precondition'` or `'diagonal'` for each leaf of `params`.

  A leaf is `'diagonal'` when it has fewer than two dimensions larger than 1,
  or when its path (as `jax.tree_util.keystr`) matches the regular expression
  `embedding_pattern` (case-insensitive; empty to match nothing).
  """
  pattern = re.compile(embedding_pattern, re.IGNORECASE) if embedding_pattern \
      else None

  def label(path, leaf):
    big_dims = sum(d > 1 for d in getattr(leaf, "shape", ()))
    embedding = pattern is not None and pattern.search(
        jax.tree_util.keystr(path))
    return DIAGONAL if big_dims < 2 or embedding else PRECONDITION

  return jax.tree_util.tree_map_with_path(label, params)


def partition(preconditioned: optax.GradientTransformation,
              diagonal: optax.GradientTransformation,
              embedding_pattern: str = "embed") -> optax.GradientTransformation:
  """`optax.partition` of matrices/tensors to `preconditioned`, the rest
  (scalars, vectors, embeddings; see `precondition_labels`) to `diagonal`.

  Both transformations should include their learning rate (e.g. `fo.foam`
  and `optax.adamw`). `fo.stats` works on the resulting state. A step with a
  non-finite gradient in any leaf is skipped for both parts
  (`skip_nonfinite`).
  """
  return skip_nonfinite(optax.partition(
      {PRECONDITION: preconditioned, DIAGONAL: diagonal},
      lambda params: precondition_labels(params, embedding_pattern)))
