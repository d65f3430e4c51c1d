"""foam_optax: FOAM, Shampoo and SOAP as optax gradient transformations."""

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
