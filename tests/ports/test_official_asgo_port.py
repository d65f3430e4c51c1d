"""Properties of the float64 port of the official ASGO/DASGO code.

`official_asgo.py` is the reference that `fo.asgo`/`fo.dasgo` are tested
against, so its own behaviour is pinned here: the inverse roots against an
eigh-based root, where the damping enters, the identity fallback, the side
that is preconditioned, DASGO's diagonal on a hand-worked example, and the
routing and schedule of the official runs. Pure NumPy.
"""

import math

import numpy as np
import pytest

from official_asgo import (
    ASGO_YAML, DASGO_YAML, OfficialASGO, OfficialDASGO,
    matrix_inverse_root_newtonschulz, matrix_inverse_root_polar_express,
    matrix_inverse_root_svd, official_lr, official_route,
    polar_express_coefficients)


def _spd(d, cond, seed):
  """A random SPD matrix with eigenvalues geometrically from 1 to 1/cond."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((d, d)))
  lam = np.geomspace(1.0, 1.0 / cond, d)
  return (q * lam) @ q.T, q, lam


def _eigh_root(v, shift=0.0):
  """(V + shift I)^(-1/2) from eigh."""
  lam, q = np.linalg.eigh(v)
  return (q * (lam + shift) ** -0.5) @ q.T


def _rel(a, b):
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_polar_express_coefficient_schedule():
  hs = polar_express_coefficients(10)
  assert len(hs) == 10
  assert hs[0] == pytest.approx((8.28721201814563 / 1.01,
                                 -23.595886519098837 / 1.01**3,
                                 17.300387312530933 / 1.01**5), rel=1e-15)
  assert hs[6] == pytest.approx((1.8750014808534479 / 1.01,
                                 -1.2500016453999487 / 1.01**3,
                                 0.3750001645474248 / 1.01**5), rel=1e-15)
  # The last listed triple carries no safety factor and repeats.
  assert hs[7:] == [(1.875, -1.25, 0.375)] * 3
  # Fewer steps than listed: a prefix of the scaled list, no final triple.
  assert polar_express_coefficients(5) == hs[:5]


@pytest.mark.parametrize("d,cond", [(2, 1.0), (5, 10.0), (6, 1e2), (8, 1e3)])
def test_polar_express_is_inverse_square_root(d, cond):
  # Ten steps take every eigenvalue ratio lam / (1.01 ||V||_F) >= 1e-7 to
  # the fixed point to round-off; with cond <= 1e3 all ratios are far above
  # that, so what is left is float64 round-off of the ten matrix products,
  # ~1e-15 relative here (growing about like cond * 1e-16).
  v, _, _ = _spd(d, cond, seed=d)
  root = matrix_inverse_root_polar_express(v, eps=1e-10, N=10)
  assert _rel(root, _eigh_root(v)) < 1e-12


def test_polar_express_damping_is_only_in_the_normaliser():
  # eps = 1e-3 moves (V + eps I)^(-1/2) by ~1e-4 relative, but the official
  # code adds eps only inside ||V + eps I||_F: the root stays V^(-1/2).
  v, _, _ = _spd(4, 4.0, seed=1)
  root = matrix_inverse_root_polar_express(v, eps=1e-3, N=10)
  assert _rel(root, _eigh_root(v)) < 1e-12
  assert _rel(root, _eigh_root(v, 1e-3)) > 1e-5


def test_polar_express_on_a_zero_eigenvalue():
  # A null direction of V stays null in Y, so its Z is multiplied by a at
  # every step: the root there is prod(a) / sqrt(1.01 ||V + eps I||_F),
  # finite (no fallback), not infinite.
  eps = 1e-10
  v = np.diag([1.0, 0.0])
  root = matrix_inverse_root_polar_express(v, eps=eps, N=10)
  normalize = 1.01 * math.hypot(1.0 + eps, eps)
  prod_a = np.prod([a for a, _, _ in polar_express_coefficients(10)])
  assert root[1, 1] == pytest.approx(prod_a / math.sqrt(normalize), rel=1e-12)
  assert root[0, 0] == pytest.approx(1.0, rel=1e-12)
  assert root[0, 1] == 0.0 and root[1, 0] == 0.0


def test_polar_express_batched_equals_per_matrix():
  vs = np.stack([_spd(3, c, seed=i)[0] for i, c in enumerate([1, 10, 100])])
  batched = matrix_inverse_root_polar_express(vs, eps=1e-10, N=10)
  for i in range(3):
    single = matrix_inverse_root_polar_express(vs[i], eps=1e-10, N=10)
    np.testing.assert_allclose(batched[i], single, rtol=1e-13, atol=0)


@pytest.mark.parametrize("n_steps", [10, 100])
def test_newtonschulz_is_damped_inverse_square_root(n_steps):
  # Its fixed point is (V + eps I)^(-1/2) * sqrt((||V|| + eps) / ||V||):
  # here eps damps the matrix itself. The fixed coefficients (2, -1.5, 0.5)
  # multiply a small eigenvalue ratio by 4 per step, so 10 steps (ASGO's
  # matalg_steps) converge only for ratios above ~1e-4; cond <= 100 is
  # converged to round-off.
  eps = 1e-3
  v, _, _ = _spd(5, 100.0, seed=3)
  s = np.linalg.norm(v)
  expected = _eigh_root(v, eps) * math.sqrt((s + eps) / s)
  root = matrix_inverse_root_newtonschulz(v, eps=eps, N=n_steps)
  assert _rel(root, expected) < 1e-12


def test_newtonschulz_ten_steps_do_not_converge_on_ill_conditioned():
  v, _, _ = _spd(4, 1e7, seed=4)
  root = matrix_inverse_root_newtonschulz(v, eps=0.0, N=10)
  assert _rel(root, _eigh_root(v)) > 0.1
  root = matrix_inverse_root_newtonschulz(v, eps=0.0, N=100)
  assert _rel(root, _eigh_root(v)) < 1e-9


def test_svd_root_and_its_nan_on_a_zero_singular_value():
  v, _, _ = _spd(4, 10.0, seed=5)
  assert _rel(matrix_inverse_root_svd(v), _eigh_root(v)) < 1e-12
  assert np.isnan(matrix_inverse_root_svd(np.diag([2.0, 0.0]))).any()


def test_identity_fallback_on_a_non_finite_root():
  opt = OfficialASGO()
  v = np.eye(3)
  v[1, 2] = np.nan
  np.testing.assert_array_equal(opt.inverse_precond(v, "w", 7), np.eye(3))
  assert opt.nonfinite_events == [("w", 7)]
  v[1, 2] = np.inf
  np.testing.assert_array_equal(opt.inverse_precond(v), np.eye(3))
  assert len(opt.nonfinite_events) == 2
  # A finite root is used as it is.
  v, _, _ = _spd(3, 10.0, seed=6)
  assert _rel(opt.inverse_precond(v), _eigh_root(v)) < 1e-12
  assert len(opt.nonfinite_events) == 2


def test_identity_fallback_in_a_step():
  # With the SVD root, a gradient with a zero row makes V = G G^T exactly
  # singular: the root has NaNs, the identity replaces it, and the update is
  # the momentum alone, rescaled to RMS 0.2.
  lr, wd = 0.1, 0.1
  opt = OfficialASGO(learning_rate=lr, weight_decay=wd,
                     inv_method="_matrix_inverse_root_svd")
  g = np.array([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
  w = np.ones((2, 3))
  new = opt.step({"w": w}, {"w": g})["w"]
  assert opt.nonfinite_events == [("w", 0)]
  u = 0.1 * g * (0.2 * math.sqrt(6) / np.linalg.norm(0.1 * g))
  np.testing.assert_allclose(new, w * (1 - lr * wd) - lr * u, rtol=1e-14)


def test_zero_gradient_raises_as_the_official_code():
  # Zero momentum gives a zero update, and the rescaling divides by its norm
  # as a Python float.
  for opt in (OfficialASGO(), OfficialDASGO()):
    with pytest.raises(ZeroDivisionError):
      opt.step({"w": np.ones((2, 3))}, {"w": np.zeros((2, 3))})


def test_unsupported_inverse_root_and_ranks():
  with pytest.raises(TypeError):   # `epsilon`, not `eps`, in its signature
    OfficialASGO(inv_method="_matrix_inverse_root_newton").step(
        {"w": np.ones((2, 3))}, {"w": np.ones((2, 3))})
  for opt in (OfficialASGO(), OfficialDASGO()):
    with pytest.raises(AssertionError):
      opt.step({"b": np.ones(3)}, {"b": np.ones(3)})
  with pytest.raises(ValueError):
    OfficialASGO().step({"k": np.ones((2, 3, 4))}, {"k": np.ones((2, 3, 4))})
  with pytest.raises(RuntimeError):
    OfficialDASGO().step({"k": np.ones((2, 3, 4))}, {"k": np.ones((2, 3, 4))})


def test_missing_gradient_skips_the_parameter_and_its_decay():
  opt = OfficialASGO()
  w = np.ones((2, 3))
  new = opt.step({"w": w, "v": w}, {"w": None, "v": np.eye(2, 3)})
  np.testing.assert_array_equal(new["w"], w)
  assert not np.allclose(new["v"], w)


def test_dasgo_hand_example():
  # G = [[3, 0, 1], [4, 2, 0]]: colsum(G*G) = [25, 4, 1]. With momentum 0,
  # beta2 0 and eps 0: U = G / [5, 2, 1] = [[.6, 0, 1], [.8, 1, 0]],
  # ||U||_F = sqrt(3), rescaled to 0.2 sqrt(6): 0.2 sqrt(2) U.
  # The input side (3) is preconditioned although it is the larger one.
  lr, wd = 0.5, 0.1
  opt = OfficialDASGO(learning_rate=lr, momentum=0.0, weight_decay=wd,
                      beta2=0.0, eps=0.0)
  g = np.array([[3.0, 0.0, 1.0], [4.0, 2.0, 0.0]])
  w = np.ones((2, 3))
  new = opt.step({"w": w}, {"w": g})["w"]
  np.testing.assert_array_equal(opt.state["w"]["precond"], [25.0, 4.0, 1.0])
  u = 0.2 * math.sqrt(2) * np.array([[0.6, 0.0, 1.0], [0.8, 1.0, 0.0]])
  np.testing.assert_allclose(new, 0.95 * w - lr * u, rtol=1e-14)


def test_dasgo_two_steps_with_defaults():
  # Second step: v = 0.95 * 0.05 [25, 4, 1] + 0.05 [1, 9, 4]
  #                = [1.2375, 0.64, 0.2475] + eps; M = 0.09 G1 + 0.1 G2.
  opt = OfficialDASGO()
  g1 = np.array([[3.0, 0.0, 1.0], [4.0, 2.0, 0.0]])
  g2 = np.array([[1.0, 3.0, 0.0], [0.0, 0.0, 2.0]])
  w = np.zeros((2, 3))
  w1 = opt.step({"w": w}, {"w": g1})["w"]
  w2 = opt.step({"w": w1}, {"w": g2})["w"]
  v = np.array([1.2375, 0.64, 0.2475])
  np.testing.assert_allclose(opt.state["w"]["precond"], v, rtol=1e-15)
  u = (0.09 * g1 + 0.1 * g2) / np.sqrt(v + 1e-8)
  u = u * 0.2 * math.sqrt(6) / np.linalg.norm(u)
  np.testing.assert_allclose(w2, w1 * (1 - 1e-3 * 0.1) - 1e-3 * u,
                             rtol=1e-13)


@pytest.mark.parametrize("shape,side", [((3, 5), "left"), ((5, 3), "right"),
                                        ((4, 4), "right")])
def test_asgo_side_choice(shape, side):
  # Two steps with beta2 = momentum = 0.5, so that the left and right
  # preconditioned momenta differ even on a square matrix; the SVD root is
  # exact on these full-rank statistics.
  rng = np.random.default_rng(7)
  g1, g2 = rng.standard_normal((2,) + shape)
  lr, wd = 0.1, 0.2
  opt = OfficialASGO(learning_rate=lr, momentum=0.5, weight_decay=wd,
                     beta2=0.5, inv_method="_matrix_inverse_root_svd")
  w0 = rng.standard_normal(shape)
  w1 = opt.step({"w": w0}, {"w": g1})["w"]
  w2 = opt.step({"w": w1}, {"w": g2})["w"]
  m = 0.25 * g1 + 0.5 * g2
  d = min(shape)
  assert opt.state["w"]["precond"].shape == (d, d)
  left = _eigh_root(0.25 * g1 @ g1.T + 0.5 * g2 @ g2.T) @ m
  right = m @ _eigh_root(0.25 * g1.T @ g1 + 0.5 * g2.T @ g2)
  expected_u, other_u = (left, right) if side == "left" else (right, left)
  scale = 0.2 * math.sqrt(shape[0] * shape[1])
  expected = w1 * (1 - lr * wd) - lr * expected_u * scale / np.linalg.norm(
      expected_u)
  other = w1 * (1 - lr * wd) - lr * other_u * scale / np.linalg.norm(other_u)
  np.testing.assert_allclose(w2, expected, rtol=1e-10, atol=1e-12)
  assert np.abs(w2 - other).max() > 1e-3


@pytest.mark.parametrize("shape", [(3, 6), (6, 3)])
def test_asgo_without_averaging_is_the_polar_factor(shape):
  # momentum = beta2 = 0: U = (G G^T)^(-1/2) G = G (G^T G)^(-1/2), the
  # orthogonal polar factor, rescaled to RMS 0.2 (||.||_F = 0.2 sqrt(mn)).
  rng = np.random.default_rng(8)
  g = rng.standard_normal(shape)
  opt = OfficialASGO(learning_rate=1.0, momentum=0.0, weight_decay=0.0,
                     beta2=0.0)
  new = opt.step({"w": np.zeros(shape)}, {"w": g})["w"]
  u, _, vt = np.linalg.svd(g, full_matrices=False)
  polar = u @ vt
  expected = -polar * 0.2 * math.sqrt(g.size) / np.linalg.norm(polar)
  np.testing.assert_allclose(new, expected, rtol=1e-10, atol=1e-12)
  assert np.linalg.norm(new) == pytest.approx(0.2 * math.sqrt(g.size),
                                              rel=1e-14)


def test_defaults_and_yaml():
  asgo = OfficialASGO()
  assert (asgo.lr, asgo.group["momentum"], asgo.group["beta2"],
          asgo.group["eps"], asgo.group["weight_decay"],
          asgo.matalg_steps) == (1e-2, 0.9, 0.8, 1e-10, 0.1, 10)
  assert asgo._matrix_power is matrix_inverse_root_polar_express
  dasgo = OfficialDASGO()
  assert (dasgo.lr, dasgo.group["momentum"], dasgo.group["beta2"],
          dasgo.group["eps"], dasgo.group["weight_decay"]) == (
              1e-3, 0.9, 0.95, 1e-8, 0.1)
  assert ASGO_YAML["learning_rate"] == 0.01
  assert DASGO_YAML["learning_rate"] == 0.01


def test_official_routing_and_schedule():
  assert official_route("transformer.token_emb.weight", 2) == "adam"
  assert official_route("module.transformer.pos_emb.weight", 2) == "adam"
  assert official_route("transformer.h.0.ln_1.weight", 1) == "adam"
  assert official_route("transformer.h.0.mlp.c_fc.bias", 1) == "adam"
  assert official_route("transformer.h.0.attn.to_q.weight", 2) == "matrix"
  # 20 steps: 2 of warmup from lr/2, then cosine over 18 to 0.02 lr.
  lr = 0.01
  assert official_lr(0, 20, lr) == pytest.approx(0.5 * lr)
  assert official_lr(1, 20, lr) == pytest.approx(0.75 * lr)
  assert official_lr(2, 20, lr) == pytest.approx(lr)
  assert official_lr(11, 20, lr) == pytest.approx(0.0002 + 0.0098 / 2)
