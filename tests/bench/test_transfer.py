"""The transfer suite's Muon multipliers net of `optax.contrib.muon`'s own
width factor, its other optimizers' directions and rules, and its recipe
(its quick run: tests/bench/test_harness.py)."""

import math

import jax
import numpy as np
import optax
import pytest

import foam_optax as fo
from foam_optax.bench import transfer


def _shapes(width, data):
  """The model's parameters as shapes: the multipliers and the directions'
  state depend on nothing else (drawn op by op, they compile a program per
  shape)."""
  return jax.eval_shape(lambda: transfer.init_params(width, data))


@pytest.mark.parametrize("width,base,readout", [(256, 128, math.sqrt(0.5)),
                                                (16, 8, 1.0)])
def test_muon_multipliers_net_of_the_alias_factor(width, base, readout):
  """optax.contrib.muon multiplies by √max(1, fan_out/fan_in): the suite
  divides the official 'muon' rule by that factor's ratio. The readout
  (width x 103) has fan_out < fan_in at 128 and 256: the rule stands;
  at 8 and 16 the alias's factor already carries it all."""
  data = transfer.CharData(context=4)
  mine = transfer.multipliers("muon", _shapes(width, data),
                              _shapes(base, data))
  assert mine["hidden1"] == pytest.approx(1.0)
  assert mine["readout"] == pytest.approx(readout)
  official = fo.mup_multipliers(_shapes(width, data), _shapes(base, data),
                                optimizer="muon")
  # The embedding (412 x width): fan_out < fan_in at every width here.
  assert mine["embed"] == pytest.approx(official["embed"])


def test_every_optimizer_of_the_full_run_has_its_direction_and_rule():
  """FOAM and Muon, outside the quick run: their directions initialise on
  the model (traced), and the rules are 'grafted' (1/r_in) and SOAP's with
  blocks of 128 (1 -> 2 blocks per side from width 32 to 256)."""
  data = transfer.CharData(context=1)
  wide, base = (_shapes(w, data) for w in (256, 32))
  for name in transfer.FULL.optimizers:
    jax.eval_shape(transfer.direction(name).init, wide)
  foam = transfer.multipliers("foam", wide, base)
  assert foam == {"embed": 1.0, "hidden1": 1 / 8, "hidden2": 1 / 8,
                  "readout": 1 / 8}
  soap = transfer.multipliers("soap", wide, base)
  assert soap["hidden1"] == pytest.approx(0.5)
  # Embedding (103 x width): √8 / √2 (1 -> 2 column blocks).
  assert soap["embed"] == pytest.approx(2.0)


def test_recipe_moves_parameters_as_documented():
  """-schedule(t) * (lr * m * u + wd * p) with u = SGD's gradient."""
  params = {"w": np.full((2, 3), 2.0, np.float32)}
  schedule = lambda count: 0.5
  tx = transfer.recipe(optax.identity(), {"w": 3.0}, 0.1, 0.01, schedule)
  # One program (op by op, every operation of the chain compiles its own).
  updates = jax.jit(lambda grads, params: tx.update(
      grads, tx.init(params), params)[0])({"w": np.ones((2, 3), np.float32)},
                                          params)
  assert np.allclose(updates["w"], -0.5 * (0.1 * 3.0 * 1.0 + 0.01 * 2.0))

