"""Refresh controllers: decide *when* a factor's eigenbasis is recomputed.

A controller is a function ``(factor, basis, eigvals, damping, cfg, key) ->
Decision`` run on a factor's check step (see the module docstring of
`foam_optax._src.controllers`); `register` makes it usable as
``controller=name`` in every transformation:

>>> import jax.numpy as jnp
>>> from foam_optax import controllers
>>> @controllers.register("always")
... def always(factor, basis, eigvals, damping, cfg, key):
...   return controllers.Decision(jnp.asarray(True), damping, eigvals,
...                               jnp.zeros((), damping.dtype))

The staleness proxies are FOAM's measure (SPEC 2.2) and its sketched
estimate, usable on their own.
"""

from foam_optax._src.controllers import CONTROLLERS
from foam_optax._src.controllers import Decision
from foam_optax._src.controllers import foam
from foam_optax._src.controllers import foam_fixed_damping
from foam_optax._src.controllers import foam_no_refresh
from foam_optax._src.controllers import probe_keys
from foam_optax._src.controllers import register
from foam_optax._src.controllers import residual
from foam_optax._src.controllers import sketched_staleness_proxy
from foam_optax._src.controllers import stale
from foam_optax._src.controllers import staleness_proxy

__all__ = [
    "CONTROLLERS",
    "Decision",
    "foam",
    "foam_fixed_damping",
    "foam_no_refresh",
    "probe_keys",
    "register",
    "residual",
    "sketched_staleness_proxy",
    "stale",
    "staleness_proxy",
]
