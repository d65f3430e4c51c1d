"""Shampoo-family optimizers for JAX as optax gradient transformations.

FOAM, Shampoo, SOAP, ASGO, DASGO and bias-corrected AdamW, each a
pure-functional `optax.GradientTransformation` that works under `jax.jit`
and inside optax's chains and wrappers.

Optimizers (an alias with a learning rate, and its `scale_by_*` direction):

- `foam` / `scale_by_foam`: Shampoo whose cached eigenbases are refreshed
  only when FOAM's staleness proxy asks for it, with adaptive damping
  (the FOAM paper, ICML 2026).
- `shampoo` / `scale_by_shampoo`: Shampoo refreshed every
  `check_frequency` steps, the paper's baseline.
- `soap` / `scale_by_soap`: SOAP, Adam in the factors' eigenbasis, as the
  official code.
- `asgo` / `scale_by_asgo` and `dasgo` / `scale_by_dasgo`: ASGO (one factor
  per matrix) and its diagonal variant DASGO, as the official code.
- `bias_corrected_adamw` / `scale_by_bias_corrected_adam`: AdamW corrected
  for coupling and Jensen bias from per-microbatch gradients
  (`microbatch_grads`); the `bias_correction` option does the same for
  `shampoo`, `foam` and `soap`.

Around them:

- `partition`, `precondition_labels`: matrices to a Shampoo-family
  optimizer, vectors, norms and embeddings to a diagonal one.
- `mup_multipliers`, `scale_by_mup`, `nnx_dimension_numbers`: learning-rate
  transfer across widths (μP); `scale_by_spectral_norm`: explicit spectral
  normalisation of each update.
- `DimensionNumbers`: which axes of a leaf form its matrix (stacked layers,
  attention heads).
- `stats`, `find_states`, `factor_stacks`, `block_stacks`: counters,
  damping and skipped steps of any optimizer here, found anywhere in a
  chain; the factor stacks a state holds.
- `skip_nonfinite`, `decay_updated_weights`: skipping of non-finite steps
  for a hand-built chain; SOAP's weight decay after the update.
- `state_sharding`, `relayout`: the state's shardings on a device mesh, and
  moving a state between device counts.
- `controllers` (refresh rules and their registry) and `kernels` (the
  linear algebra).
- The states' types: `ScaleByFoamState` (with `LeafState`,
  `BlockClassState`, `FactorStack`, `SkipCounters`), `FactorStackView`,
  `ScaleByDasgoState`, `ScaleByBiasCorrectedAdamState`,
  `ScaleBySpectralNormState`.

Example:

>>> import jax.numpy as jnp, optax
>>> import foam_optax as fo
>>> tx = fo.partition(fo.foam(1e-3), optax.adamw(1e-3))
>>> state = tx.init({"w": jnp.ones((8, 4)), "b": jnp.zeros(4)})
>>> int(fo.stats(state)["step"])
0

More: the README (quickstart and recipes), the docs/ pages (every option,
what each alias reproduces, several devices, design), BENCHMARKS.md (every
measurement, with an overview), and each function's docstring.
"""

from foam_optax import controllers
from foam_optax import kernels
from foam_optax._src.alias import asgo
from foam_optax._src.alias import foam
from foam_optax._src.alias import shampoo
from foam_optax._src.alias import soap
from foam_optax._src.bias_corrected_adamw import bias_corrected_adamw
from foam_optax._src.bias_corrected_adamw import scale_by_bias_corrected_adam
from foam_optax._src.bias_corrected_adamw import ScaleByBiasCorrectedAdamState
from foam_optax._src.dasgo import dasgo
from foam_optax._src.dasgo import scale_by_dasgo
from foam_optax._src.dasgo import ScaleByDasgoState
from foam_optax._src.diagnostics import block_stacks
from foam_optax._src.diagnostics import factor_stacks
from foam_optax._src.diagnostics import FactorStackView
from foam_optax._src.diagnostics import stats
from foam_optax._src.factors import FactorStack
from foam_optax._src.layout import DimensionNumbers
from foam_optax._src.layout import nnx_dimension_numbers
from foam_optax._src.mesh import relayout
from foam_optax._src.mesh import state_sharding
from foam_optax._src.microbatches import microbatch_grads
from foam_optax._src.mup import mup_multipliers
from foam_optax._src.mup import scale_by_mup
from foam_optax._src.partition import partition
from foam_optax._src.partition import precondition_labels
from foam_optax._src.skipping import skip_nonfinite
from foam_optax._src.spectral import scale_by_spectral_norm
from foam_optax._src.spectral import ScaleBySpectralNormState
from foam_optax._src.state import BlockClassState
from foam_optax._src.state import find_states
from foam_optax._src.state import LeafState
from foam_optax._src.state import ScaleByFoamState
from foam_optax._src.state import SkipCounters
from foam_optax._src.transform import scale_by_asgo
from foam_optax._src.transform import scale_by_foam
from foam_optax._src.transform import scale_by_shampoo
from foam_optax._src.transform import scale_by_soap
from foam_optax._src.weight_decay import decay_updated_weights

__version__ = "0.1.0"

__all__ = [
    "BlockClassState",
    "DimensionNumbers",
    "FactorStack",
    "FactorStackView",
    "LeafState",
    "ScaleByBiasCorrectedAdamState",
    "ScaleByDasgoState",
    "ScaleByFoamState",
    "ScaleBySpectralNormState",
    "SkipCounters",
    "asgo",
    "bias_corrected_adamw",
    "block_stacks",
    "controllers",
    "dasgo",
    "decay_updated_weights",
    "factor_stacks",
    "find_states",
    "foam",
    "kernels",
    "microbatch_grads",
    "mup_multipliers",
    "nnx_dimension_numbers",
    "partition",
    "precondition_labels",
    "relayout",
    "scale_by_asgo",
    "scale_by_bias_corrected_adam",
    "scale_by_dasgo",
    "scale_by_foam",
    "scale_by_mup",
    "scale_by_shampoo",
    "scale_by_soap",
    "scale_by_spectral_norm",
    "shampoo",
    "skip_nonfinite",
    "soap",
    "state_sharding",
    "stats",
]
