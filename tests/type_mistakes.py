"""Calls a type checker must judge: each line marked ``# error:`` is a
mistake it must flag, and every other line is correct code it must accept
(tests/test_typing.py). Read by the checker only, never run."""

import jax.numpy as jnp
import optax
from typing_extensions import assert_type

import foam_optax as fo
from foam_optax._src import options
from foam_optax._src.config import Config

# Correct calls.
fo.foam(1e-3, weight_decay=1e-4)
fo.foam(learning_rate=optax.cosine_decay_schedule(3e-3, 200),
        weight_decay_mask=lambda p: p, block_size=None)
fo.shampoo(1e-3, check_frequency=100, exponent=4)
fo.soap(3e-3, controller="foam", max_precond_dim=None)
fo.asgo(1e-2, root_method="eigh", controller="foam", check_frequency=20)
fo.dasgo(1e-3, epsilon=1e-8)
fo.bias_corrected_adamw(3e-4, method="two_group", mask=None)
fo.scale_by_foam(mu_dtype=jnp.bfloat16, bias_correction="cross_fit")
fo.scale_by_spectral_norm(power_iterations=2)
assert_type(fo.foam(1e-3), optax.GradientTransformationExtraArgs)
assert_type(fo.scale_by_soap(), optax.GradientTransformation)
assert_type(Config().b1, float)
assert_type(Config().block_size, "int | None")
assert_type(Config(grafting="sgd").grafting, options.Grafting)

# Misspelled or unknown keywords.
fo.scale_by_soap(treshold=0.5)  # error: threshold
fo.foam(1e-3, weight_decy=1e-4)  # error: weight_decay
fo.asgo(1e-2, eps=1e-10)  # error: ASGO's damping is epsilon
fo.dasgo(1e-3, eps=1e-8)  # error: renamed epsilon (accepted, deprecated)
fo.bias_corrected_adamw(3e-4, epsilon=1e-8)  # error: optax.adamw's eps
fo.scale_by_foam(learning_rate=1e-3)  # error: the alias takes it
Config(weight_decay=0.1)  # error: an alias argument, not an option

# Positional arguments.
fo.foam(1e-3, 0.9)  # error: keyword-only after learning_rate
fo.scale_by_shampoo(0.9)  # error: keyword-only

# Wrong types for ints, floats and bools.
fo.foam(1e-3, check_frequency="10")  # error: str for int
fo.foam(1e-3, check_frequency=10.0)  # error: float for int
fo.soap(3e-3, block_size=512.0)  # error: float for int | None
fo.shampoo(1e-3, b1="0.9")  # error: str for float
fo.foam("1e-3")  # error: str for a learning rate
fo.soap(3e-3, weight_decay=None)  # error: None for float
fo.foam(1e-3, precondition_1d="yes")  # error: str for bool
fo.scale_by_bias_corrected_adam(variance_correction=None)  # error: bool
Config(b1="0.95")  # error: str for float
Config().b1.upper()  # error: b1 is a float

# Values outside a Literal.
fo.foam(1e-3, grafting="adamw")  # error: not a grafting choice
fo.soap(3e-3, controller="soap")  # error: not a controller
fo.scale_by_asgo(root_method="polar")  # error: not a root method
fo.shampoo(1e-3, bias_correction="loo")  # error: not a bias correction
fo.bias_corrected_adamw(3e-4, method="loo")  # error: not a method
Config(proxy="sketched")  # error: not a proxy
