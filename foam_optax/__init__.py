"""foam_optax: FOAM, Shampoo and SOAP as optax gradient transformations."""

from foam_optax._src.alias import foam
from foam_optax._src.alias import scale_by_shampoo
from foam_optax._src.alias import scale_by_soap
from foam_optax._src.alias import shampoo
from foam_optax._src.alias import skip_nonfinite
from foam_optax._src.alias import decay_updated_weights
from foam_optax._src.alias import soap
from foam_optax._src.diagnostics import stats
from foam_optax._src.mup import mup_multipliers
from foam_optax._src.mup import scale_by_mup
from foam_optax._src.factors import FactorState
from foam_optax._src.partition import partition
from foam_optax._src.shaping import DimensionNumbers
from foam_optax._src.partition import precondition_labels
from foam_optax._src.sharding import relayout
from foam_optax._src.sharding import state_sharding
from foam_optax._src.spectral import scale_by_spectral_norm
from foam_optax._src.spectral import ScaleBySpectralNormState
from foam_optax._src.transform import BlockClassState
from foam_optax._src.transform import LeafState
from foam_optax._src.transform import scale_by_foam
from foam_optax._src.transform import ScaleByFoamState

__version__ = "0.1.0"


def __getattr__(name):
  # Renamed; the old name goes in the next release.
  if name == "GroupState":
    import warnings
    warnings.warn("foam_optax.GroupState is deprecated: it is now "
                  "BlockClassState.", DeprecationWarning, stacklevel=2)
    return BlockClassState
  raise AttributeError(f"module 'foam_optax' has no attribute {name!r}")

__all__ = [
    "DimensionNumbers",
    "FactorState",
    "BlockClassState",
    "LeafState",
    "ScaleByFoamState",
    "ScaleBySpectralNormState",
    "decay_updated_weights",
    "foam",
    "mup_multipliers",
    "partition",
    "precondition_labels",
    "relayout",
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
