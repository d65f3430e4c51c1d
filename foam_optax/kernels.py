"""The linear-algebra kernels the optimizers are built from.

Each works on one factor (no batch axis; map or vmap it) or, where it says
so, on a (k, m, n) stack of blocks. They are the optimizers' own code, for
benchmarks, profiling and custom controllers (`foam_optax.controllers`).
`using_eigh` swaps the eigendecomposition every optimizer calls, e.g. to
count the ones a jitted step really executes.
"""

from foam_optax._src.grafting import adam_direction
from foam_optax._src.grafting import match_norms
from foam_optax._src.linalg import eigh
from foam_optax._src.linalg import fresh_eigendecomposition
from foam_optax._src.linalg import gram_left
from foam_optax._src.linalg import gram_right
from foam_optax._src.linalg import inverse_root
from foam_optax._src.linalg import inverse_root_weights
from foam_optax._src.linalg import matmul
from foam_optax._src.linalg import newton_schulz_inverse_sqrt
from foam_optax._src.linalg import polar_express_inverse_sqrt
from foam_optax._src.linalg import power_qr_refresh
from foam_optax._src.linalg import rotate
from foam_optax._src.linalg import unrotate
from foam_optax._src.linalg import using_eigh
from foam_optax._src.preconditioners import apply_inverse_roots

__all__ = [
    "adam_direction",
    "apply_inverse_roots",
    "eigh",
    "fresh_eigendecomposition",
    "gram_left",
    "gram_right",
    "inverse_root",
    "inverse_root_weights",
    "match_norms",
    "matmul",
    "newton_schulz_inverse_sqrt",
    "polar_express_inverse_sqrt",
    "power_qr_refresh",
    "rotate",
    "unrotate",
    "using_eigh",
]
