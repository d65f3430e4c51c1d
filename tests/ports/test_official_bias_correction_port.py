"""Properties of the float64 port of the official bias-corrected optimizers.

`official_bias_correction.py` ports fastino-ai/preconditioner-bias-correction
@ 4e722e9. These tests check what the official code implies on its own:
identical microbatches make every corrected mode equal its uncorrected one
(with the one exception the official trainer has: the LOO step under an
active global clip), hand-computed Jensen / delta-method corrections, the
sign-flip zeroing of the LOO update, the refresh schedule of the Shampoo
statistics, and the equivalence of the three official Shampoo
implementations.
"""

import numpy as np
import pytest

from official_bias_correction import (BiasCorrectedAdamW,
                                      BiasCorrectedShampoo,
                                      BiasCorrectedShampooStreaming,
                                      BiasCorrectedShampooTwoPass,
                                      LOOBCAdamW, clip_grad_norm_)

SHAPES = {"w1": (5, 4), "w2": (3, 5), "bias": (4,)}
SHAMPOO_CLASSES = [BiasCorrectedShampoo, BiasCorrectedShampooStreaming,
                   BiasCorrectedShampooTwoPass]


def _params(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return {n: rng.standard_normal(s) for n, s in shapes.items()}


def _microbatches(shapes, n_mb, steps, seed=1, identical=False, scale=1.0):
  """Per step a dict of (n_mb, *shape) gradients with a wide spread across
  microbatches (lognormal scales), or n_mb copies of one gradient."""
  rng = np.random.default_rng(seed)
  seq = []
  for _ in range(steps):
    s_k = np.exp(rng.standard_normal(n_mb))
    g = {}
    for n, s in shapes.items():
      mean = rng.standard_normal(s)
      if identical:
        g[n] = scale * np.broadcast_to(mean, (n_mb,) + s).copy()
      else:
        noise = rng.standard_normal((n_mb,) + s)
        g[n] = scale * (mean + s_k.reshape((-1,) + (1,) * len(s)) * noise)
    seq.append(g)
  return seq


def _run(opt, params, seq):
  for g in seq:
    params = opt.step(params, g)
  return params


def _assert_close(a, b, rtol):
  for n in b:
    scale = np.max(np.abs(b[n]))
    np.testing.assert_allclose(a[n], b[n], rtol=0, atol=rtol * scale,
                               err_msg=n)


def _assert_differ(a, b, rtol):
  assert max(np.max(np.abs(a[n] - b[n])) / np.max(np.abs(b[n]))
             for n in b) > rtol


# ---- AdamW --------------------------------------------------------------


@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("mode", ["cf", "inv", "full"])
def test_adamw_identical_microbatches_equal_std(mode, clip):
  params = _params(SHAPES)
  seq = _microbatches(SHAPES, 4, 8, identical=True, scale=0.7)
  kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, max_grad_norm=clip)
  ours = _run(BiasCorrectedAdamW(mode=mode, **kw), params, seq)
  std = _run(BiasCorrectedAdamW(mode="std", **kw), params, seq)
  _assert_close(ours, std, 1e-12)
  # The spread does change the corrected modes.
  noisy = _microbatches(SHAPES, 4, 8, scale=0.7)
  _assert_differ(_run(BiasCorrectedAdamW(mode=mode, **kw), params, noisy),
                 _run(BiasCorrectedAdamW(mode="std", **kw), params, noisy),
                 1e-3)


@pytest.mark.parametrize("jensen", [False, True])
def test_loo_identical_microbatches_equal_std_without_clip(jensen):
  params = _params(SHAPES)
  seq = _microbatches(SHAPES, 4, 8, identical=True)
  kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
  ours = _run(LOOBCAdamW(jensen_correction=jensen, **kw), params, seq)
  std = _run(BiasCorrectedAdamW(mode="std", **kw), params, seq)
  _assert_close(ours, std, 1e-12)


def test_loo_update_ignores_the_global_clip():
  """The official trainer clips p.grad, which is the buffer the persistent
  m / v EMAs read, but the LOO update u_total is built from the unclipped
  microbatch gradients. So under an active clip, identical microbatches do
  NOT reproduce std AdamW: the first LOO step is std's step without the
  clip, while std's m carries the clip factor and its v does not."""
  params = {"w": np.zeros(3)}
  g = np.array([30.0, -40.0, 0.5])   # norm ~50: clip factor ~1/50
  mb = {"w": np.stack([g, g, g, g])}
  kw = dict(lr=1.0, betas=(0.9, 0.95), eps=0.0, weight_decay=0.0)
  loo = LOOBCAdamW(jensen_correction=True, max_grad_norm=1.0, **kw)
  std_clip = BiasCorrectedAdamW(mode="std", max_grad_norm=1.0, **kw)
  std_free = BiasCorrectedAdamW(mode="std", **kw)
  step_loo = loo.step(params, mb)["w"]
  step_clip = std_clip.step(params, mb)["w"]
  step_free = std_free.step(params, mb)["w"]
  np.testing.assert_allclose(step_loo, -np.sign(g), rtol=1e-12)
  np.testing.assert_allclose(step_loo, step_free, rtol=1e-12)
  coef = 1.0 / (np.linalg.norm(g) + 1e-6)
  np.testing.assert_allclose(step_clip, -coef * np.sign(g), rtol=1e-12)
  # The persistent EMAs of the LOO optimizer see the clipped mean.
  np.testing.assert_allclose(loo.state["w"]["exp_avg"], 0.1 * coef * g,
                             rtol=1e-12)


def test_loo_jensen_hand_example_and_sign_flip_zeroing():
  """m = 2, first step, eps = 0: fold r has numerator g_r and denominator
  |g_other|. Coordinates (g_1, g_2):
    (2, 1):  u_first = (2/1 + 1/2)/2 = 1.25, u_third = (2/1 + 1/8)/2,
             Var(1, 2) = 0.5 (ddof 1), u = 1.25 - 0.5 * 1.0625 = 0.71875;
    (1, -4): u_first = (1/4 - 4)/2 = -1.875, u_third = (1/64 - 4)/2,
             Var(4, 1) = 4.5, u = -1.875 + 8.96484375 > 0: flipped, so 0;
    (1, 1):  Var = 0, u = 1."""
  params = {"w": np.zeros(3)}
  mb = {"w": np.array([[2.0, 1.0, 1.0], [1.0, -4.0, 1.0]])}
  kw = dict(lr=1.0, betas=(0.9, 0.95), eps=0.0, weight_decay=0.0)
  out = LOOBCAdamW(jensen_correction=True, **kw).step(params, mb)["w"]
  np.testing.assert_allclose(-out, [0.71875, 0.0, 1.0], rtol=1e-12,
                             atol=1e-15)
  assert out[1] == 0.0
  plain = LOOBCAdamW(jensen_correction=False, **kw).step(params, mb)["w"]
  np.testing.assert_allclose(-plain, [1.25, -1.875, 1.0], rtol=1e-12)


def test_loo_denominator_is_the_square_of_the_leave_one_out_mean():
  """Fold r's v uses (mean_{j != r} g_j)**2, not mean_{j != r} g_j**2:
  with m = 3, g = (1, 2, 6), fold 1's denominator is |(2 + 6)/2| = 4."""
  params = {"w": np.zeros(1)}
  mb = {"w": np.array([[1.0], [2.0], [6.0]])}
  out = LOOBCAdamW(lr=1.0, eps=0.0, weight_decay=0.0).step(params, mb)["w"]
  expected = (1.0 / 4.0 + 2.0 / 3.5 + 6.0 / 1.5) / 3.0
  np.testing.assert_allclose(-out, [expected], rtol=1e-12)


def test_loo_sparse_parameters_run_std_adamw():
  shapes = {"model.embed_tokens.weight": (6, 3), "w": (4, 3)}
  params = _params(shapes)
  seq = _microbatches(shapes, 4, 5)
  kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
  ours = _run(LOOBCAdamW(jensen_correction=True, **kw), params, seq)
  emb = {"model.embed_tokens.weight": params["model.embed_tokens.weight"]}
  emb_seq = [{"model.embed_tokens.weight": g["model.embed_tokens.weight"]}
             for g in seq]
  std = _run(BiasCorrectedAdamW(mode="std", **kw), emb, emb_seq)
  _assert_close({k: ours[k] for k in std}, std, 1e-14)
  dense = _run(LOOBCAdamW(jensen_correction=True, all_dense=True, **kw),
               params, seq)
  _assert_differ({k: dense[k] for k in std}, std, 1e-6)


def test_loo_needs_two_microbatches():
  with pytest.raises(ValueError):
    LOOBCAdamW().step({"w": np.zeros(2)}, {"w": np.ones((1, 2))})


def test_adamw_full_hand_example():
  """mode full, m = 4 (A = first two, B = last two), first step, eps = 0:
  p_j = |g_j| over B, Var(bar p) = s²(p_j)/2, v_hat = mean_B g_j²,
  inv = 1/sqrt(v_hat) - Var/v_hat^(3/2), u = mean_A g * inv.
    B = (1, 3):  v_hat = 5, Var = 2/2 = 1,  inv = 0.8/sqrt(5);
    B = (0, 4):  v_hat = 8, Var = 8/2 = 4,  inv = 0.5/sqrt(8)."""
  params = {"w": np.zeros(2)}
  mb = {"w": np.array([[1.0, 2.0], [3.0, 2.0], [1.0, 0.0], [3.0, 4.0]])}
  out = BiasCorrectedAdamW(lr=1.0, betas=(0.9, 0.95), eps=0.0,
                           weight_decay=0.0, mode="full").step(params, mb)
  g_A = np.array([2.0, 2.0])
  np.testing.assert_allclose(
      -out["w"], g_A * [0.8 / np.sqrt(5.0), 0.5 / np.sqrt(8.0)], rtol=1e-12)


def test_clip_grad_norm_scales_in_place():
  a, b = np.array([3.0, 0.0]), np.array([0.0, 4.0])
  total = clip_grad_norm_([a, b], 1.0)
  assert total == 5.0
  np.testing.assert_allclose(np.concatenate([a, b]),
                             np.array([3.0, 0, 0, 4.0]) / (5.0 + 1e-6))


# ---- Shampoo ------------------------------------------------------------

_SHAMPOO_KW = dict(lr=1e-2, weight_decay=0.1, adamw_betas=(0.9, 0.95),
                   shampoo_max_dim=4864, shampoo_root_freq=5)


@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("cls", SHAMPOO_CLASSES)
def test_shampoo_identical_microbatches_equal_std(cls, clip):
  params = _params(SHAPES)
  seq = _microbatches(SHAPES, 4, 12, identical=True, scale=0.5)
  std = _run(cls(mode="std", max_grad_norm=clip, **_SHAMPOO_KW), params, seq)
  modes = ["cf", "full"] + (["inv"] if cls is not BiasCorrectedShampooTwoPass
                            else [])
  for mode in modes:
    ours = _run(cls(mode=mode, max_grad_norm=clip, **_SHAMPOO_KW), params,
                seq)
    # Rank-deficient first factors put eigenvalues at the damping (1e-6),
    # which amplifies round-off to ~1e-11.
    _assert_close(ours, std, 1e-8)


@pytest.mark.parametrize("mode", ["std", "cf", "inv", "full"])
def test_shampoo_three_implementations_agree(mode):
  """The streaming and two-pass classes are memory layouts of the same
  mathematics as shampoo.py, with two exceptions of the official code:
  the streaming class hands the B gradients to the optimizer in mode cf as
  in full, so its cf applies the variance correction (cf == full there);
  the two-pass path has no variance correction in mode inv (inv == std)."""
  shapes = {"w1": (4, 4), "w2": (3, 3), "bias": (4,)}
  params = _params(shapes)
  seq = _microbatches(shapes, 6, 11)
  ref = _run(BiasCorrectedShampoo(mode=mode, **_SHAMPOO_KW), params, seq)
  streaming = _run(BiasCorrectedShampooStreaming(mode=mode, **_SHAMPOO_KW),
                   params, seq)
  if mode == "cf":
    full = _run(BiasCorrectedShampoo(mode="full", **_SHAMPOO_KW), params, seq)
    _assert_close(streaming, full, 1e-11)
    _assert_differ(ref, full, 1e-6)
  else:
    _assert_close(streaming, ref, 1e-11)
  two_pass = _run(BiasCorrectedShampooTwoPass(mode=mode, **_SHAMPOO_KW),
                  params, seq)
  if mode == "inv":
    std = _run(BiasCorrectedShampoo(mode="std", **_SHAMPOO_KW), params, seq)
    _assert_close(two_pass, std, 1e-11)
    _assert_differ(ref, std, 1e-6)
  else:
    _assert_close(two_pass, ref, 1e-11)


def _diagonal_case(cls, mode, damping):
  """2 x 2 parameter, first step, lr = 1, no weight decay; A gradients with
  mean [[1, 2], [3, 4]], B gradients diag(1, 2) and diag(3, 2). Returns the
  update -Δp and the left factor's weights d (equal to the right's)."""
  opt = cls(lr=1.0, weight_decay=0.0, shampoo_beta1=0.9, shampoo_beta2=0.95,
            shampoo_damping=damping, shampoo_root_freq=5, mode=mode)
  A1 = np.array([[0.0, 2.0], [3.0, 5.0]])
  A2 = np.array([[2.0, 2.0], [3.0, 3.0]])
  B1 = np.diag([1.0, 2.0])
  B2 = np.diag([3.0, 2.0])
  out = opt.step({"w": np.zeros((2, 2))}, {"w": np.stack([A1, A2, B1, B2])})
  return -out["w"], np.diag(opt.state["w"]["P_L_corr"])


@pytest.mark.parametrize("cls", SHAMPOO_CLASSES)
def test_shampoo_variance_corrected_weights_hand_example(cls):
  """L = 0.05 * mean_B G Gᵀ = diag(0.25, 0.2) (+λ). Row norms² over B:
  (1, 9) and (4, 4), so Var_1 = 0.05² · s²(1, 9) / 2 = 0.04, Var_2 = 0, and
  w_1 = D^(-1/4) - (5/32) D^(-9/4) Var = sqrt(2) (1 - (5/32)(0.04/0.0625))
      = 0.9 sqrt(2),   w_2 = 0.2^(-1/4);
  the update is diag(w) M diag(w) with M = 0.1 g_A (no bias correction)."""
  update, d = _diagonal_case(cls, "full", 1e-12)
  w = np.array([0.9 * np.sqrt(2.0), 0.2 ** -0.25])
  np.testing.assert_allclose(d, w, rtol=1e-9)
  M = 0.1 * np.array([[1.0, 2.0], [3.0, 4.0]])
  np.testing.assert_allclose(update, w[:, None] * M * w[None, :], rtol=1e-9)
  update_cf, d_cf = _diagonal_case(cls, "cf", 1e-12)
  if cls is BiasCorrectedShampooStreaming:   # its cf runs as full
    np.testing.assert_allclose(d_cf, w, rtol=1e-9)
  else:
    np.testing.assert_allclose(d_cf, [np.sqrt(2.0), 0.2 ** -0.25], rtol=1e-9)


@pytest.mark.parametrize("cls", SHAMPOO_CLASSES)
def test_shampoo_variance_weights_never_reach_the_clamp(cls):
  """The ell_j are non-negative with mean D, so Var(bar ell) <= D² and
  w_k >= (1 - 5/32) D^(-1/4): the max(0, .) never binds in mode full. One
  non-zero B microbatch out of two attains the bound at the first step."""
  opt = cls(lr=1.0, weight_decay=0.0, shampoo_damping=1e-12, mode="full")
  A = np.ones((3, 3))
  mb = {"w": np.stack([A, A, np.diag([1.0, 1.0, 1.0]), np.zeros((3, 3))])}
  opt.step({"w": np.zeros((3, 3))}, mb)
  D = 0.05 * 0.5 + 1e-12
  np.testing.assert_allclose(np.linalg.eigvalsh(opt.state["w"]["P_L_corr"]),
                             np.full(3, (27.0 / 32.0) * D ** -0.25),
                             rtol=1e-9)
  # Heavy-tailed random microbatches over several refreshes stay in range.
  shapes = {"w": (4, 3)}
  opt = cls(mode="full", shampoo_root_freq=2, **{
      k: v for k, v in _SHAMPOO_KW.items() if k != "shampoo_root_freq"})
  params = _params(shapes)
  for t, g in enumerate(_microbatches(shapes, 4, 7, seed=5)):
    params = opt.step(params, g)
    if t % 2 == 0:
      st = opt.state["w"]
      D, Q = np.linalg.eigh(st["L"] + 1e-6 * np.eye(4))
      ratio = np.diag(Q.T @ st["P_L_corr"] @ Q) / D ** -0.25
      assert np.all(ratio >= 27.0 / 32.0 - 1e-12) and np.all(ratio <= 1.0)


@pytest.mark.parametrize("cls", SHAMPOO_CLASSES)
def test_shampoo_statistics_only_move_at_refreshes(cls):
  """L and R are EMAs over refresh steps only (trainer steps 0, f, 2f, ...);
  in between only the momentum moves and the cached roots are reused."""
  params = _params(SHAPES)
  opt = cls(mode="full", **_SHAMPOO_KW)
  seq = _microbatches(SHAPES, 4, 7)
  history = []
  for g in seq:
    params = opt.step(params, g)
    history.append((opt.state["w1"]["L"].copy(),
                    opt.state["w1"]["P_L_corr"].copy(),
                    opt.state["w1"]["M"].copy()))
  for t in range(1, 5):
    np.testing.assert_array_equal(history[t][0], history[0][0])
    np.testing.assert_array_equal(history[t][1], history[0][1])
    assert not np.array_equal(history[t][2], history[t - 1][2])
  assert not np.array_equal(history[5][0], history[4][0])
  np.testing.assert_array_equal(history[6][0], history[5][0])


def test_shampoo_one_dimensional_parameters_run_plain_adamw():
  """Parameters Shampoo does not take get the AdamW fallback with no
  correction; in cf / full they see group A only."""
  shapes = {"bias": (4,)}
  params = _params(shapes)
  seq = _microbatches(shapes, 4, 6)
  kw = dict(lr=1e-2, weight_decay=0.1)
  ours = _run(BiasCorrectedShampooTwoPass(mode="full",
                                          adamw_betas=(0.9, 0.95), **kw),
              params, seq)
  a_only = [{"bias": np.concatenate([g["bias"][:2], g["bias"][:2]])}
            for g in seq]
  plain = _run(BiasCorrectedAdamW(mode="std", betas=(0.9, 0.95), **kw),
               params, a_only)
  _assert_close(ours, plain, 1e-13)
