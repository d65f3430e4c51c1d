"""`fo.soap` with its defaults against the official SOAP, step for step.

The official code is ported line by line to float64 NumPy in
`official_soap.py` (commit a1e5535 of github.com/nikhilvyas/SOAP). Both
run 60 steps of a drifting gradient sequence from the same parameters; the
library in float64 must stay within round-off of the port.

The first bases come from one gradient, so a factor's statistic then has
rank at most the product of the other dimensions. Inside a null space of
two or more dimensions the eigenbasis is arbitrary (it differs between
eigh implementations, and the official result with it), so every shape
here leaves each factor at most one rank short: (6, 5), (3, 4, 5),
vectors of length 2 when preconditioned.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import foam_optax as fo
from official_soap import SOAP
from helpers import FAST_COMPILE

STEPS = 60
LEARNING_RATE = 1e-2
# Round-off is ~1e-15 relative; the bound leaves room for other LAPACKs.
TOLERANCE = 1e-8


def _problem(shapes, seed=0):
  """Initial parameters and a gradient sequence whose mean drifts, so the
  bases keep moving. Vectors longer than 2 have gradient entries scaled
  down to 1e-7, where Adam's epsilon (and where it sits) shapes the step."""
  rng = np.random.default_rng(seed)
  params = [rng.standard_normal(s) for s in shapes]
  base = [rng.standard_normal(s) for s in shapes]
  drift = [rng.standard_normal(s) for s in shapes]
  scales = [np.logspace(0, -7, s[0]) if len(s) == 1 and s[0] > 2 else 1.0
            for s in shapes]
  grads = [[scale * (b + 0.5 * np.sin(0.1 * t) * d +
                     0.3 * rng.standard_normal(s))
            for b, d, s, scale in zip(base, drift, shapes, scales)]
           for t in range(STEPS)]
  return params, grads


def _run_library(tx, params, grads):
  """Parameters after each step, one jitted scan."""
  stacked = [jnp.asarray(np.stack([g[i] for g in grads]))
             for i in range(len(params))]

  def body(carry, g):
    p, state = carry
    updates, state = tx.update(g, state, p)
    p = [a + u for a, u in zip(p, updates)]
    return (p, state), p

  p0 = [jnp.asarray(x) for x in params]
  _, trajectory = jax.jit(lambda c, g: lax.scan(body, c, g),
                          compiler_options=FAST_COMPILE)(
                              (p0, tx.init(p0)), stacked)
  return [np.asarray(x) for x in trajectory]


def _run_official(params, grads, **kwargs):
  opt = SOAP(params, lr=LEARNING_RATE, **kwargs)
  steps = [opt.step(g) for g in grads]
  return [np.stack([s[i] for s in steps]) for i in range(len(params))]


def _max_relative_difference(ours, official):
  """Largest |difference| over steps, relative to each leaf's largest entry."""
  return max(float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
             for a, b in zip(ours, official))


def _compare(shapes, official_kwargs, **ours):
  params, grads = _problem(shapes)
  with jax.enable_x64(True):
    tx = fo.soap(LEARNING_RATE, **dict(official_kwargs, **ours))
    trajectory = _run_library(tx, params, grads)
  official = _run_official(params, grads, **official_kwargs)
  for p0, path in zip(params, official):
    # Not trivially equal: every leaf moves (but on the first step).
    np.testing.assert_array_equal(path[0], p0)
    assert np.max(np.abs(path[-1] - p0)) > 0.05 * np.max(np.abs(p0))
  return _max_relative_difference(trajectory, official)


# A matrix, a rank-3 tensor (one factor per dimension), a vector (Adam:
# no factor without precondition_1d) and a scalar.
DEFAULT_SHAPES = [(6, 5), (3, 4, 5), (7,), ()]


@pytest.mark.parametrize("refresh_batching", [
    "map",
    # Slow: 'bucket' changes only how a stack's refreshes are scheduled;
    # test_preconditioners.py's test_soap_matches_reference[foam-power_qr-
    # bucket] checks that path (first bases and power-QR) against the
    # reference.
    pytest.param("bucket", marks=pytest.mark.slow)])
def test_defaults_reproduce_official_soap(refresh_batching):
  # Every argument at its default on both sides (weight decay 0.01 too).
  assert _compare(DEFAULT_SHAPES, {},
                  refresh_batching=refresh_batching) <= TOLERANCE


OPTION_CASES = {
    # Vectors of length 2 get a factor, the one of length 7 is longer than
    # max_precond_dim, and so is the rank-3 tensor's last dimension.
    "precondition_1d-max_precond_dim": (
        [(6, 5), (2,), (7,), (3, 4, 5)],
        dict(precondition_1d=True, max_precond_dim=6)),
    # (2,3,4,2) merges to (6, 4, 2); (6, 5) stays a matrix.
    "merge_dims": ([(6, 5), (2, 3, 4, 2)],
                   dict(merge_dims=True, max_precond_dim=6)),
    # Size-1 dimensions: (1, 2) is a vector preconditioned without
    # precondition_1d, (3, 1, 4, 5) a rank-3 tensor; no weight decay.
    "size_one_dims": ([(1, 2), (3, 1, 4, 5)], dict(weight_decay=0.0)),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_official_options_reproduce_official_soap(case):
  shapes, official = OPTION_CASES[case]
  assert _compare(shapes, official) <= TOLERANCE


@pytest.mark.parametrize("convention", [
    dict(rotation_basis="updated"),
    dict(first_step="update"),
    dict(tensor_shaping="matrix"),
    dict(decay_after_update=False),
])
def test_other_conventions_leave_the_official_trajectory(convention):
  # Each option changes the trajectory well beyond round-off, so the
  # defaults test above could not pass with any of them.
  shapes = [(6, 5), (3, 4, 5)] if "tensor_shaping" not in convention else [
      (3, 4, 5)]
  assert _compare(shapes, {}, **convention) > 1e-6
