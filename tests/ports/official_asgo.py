"""The official ASGO and DASGO optimizers, ported line by line to NumPy float64.

Source: https://github.com/infinity-stars/ASGO at commit d3ef14b ("Revise
citation for ASGO in README.md"; the code is that of bcb2e34,
"Implementation of ASGO"), the PyTorch reference implementation of An et
al., "ASGO: Adaptive Structured Gradient Optimization" (NeurIPS 2025,
arXiv 2503.20762). Files ported:

- ``optimizers/asgo.py``: class ``asgo`` -> `OfficialASGO`;
- ``optimizers/dasgo.py``: class ``dasgo`` -> `OfficialDASGO`;
- ``optimizers/utils/matrix_decom.py``: the inverse square roots that
  ``asgo`` can select through ``inv_method``:
  ``_matrix_inverse_root_PolarExpress`` (the default),
  ``_matrix_inverse_root_newtonschulz``, ``_matrix_inverse_root_svd`` and
  ``_matrix_inverse_root_newton``;
- ``LLMmodels/config/optimizer/{asgo,dasgo}.yaml``: `ASGO_YAML`, `DASGO_YAML`;
- ``optimizers/utils/utils.py``: ``get_optimizer_and_lr_scheduler`` (which
  parameters go to which optimizer, with which arguments:
  `official_route`, `OFFICIAL_ADAM`) and ``get_lr_scheduler``
  (`official_lr`).

Each function mirrors the statements of the official one; only the tensor
library changes (``torch.mm``/``@`` -> ``@``, ``lerp_`` -> `_lerp`, which
keeps torch's two-branch formula, ``.norm()`` -> the Frobenius norm,
``.item()`` -> ``float``). The optimizers take a dict of parameters and a
dict of gradients (None: no gradient, the parameter is skipped, as
``p.grad is None`` is) in torch's layout: a weight is (out, in).

Precision: the official code computes in float32 whatever the parameters'
dtype (``torch.zeros(dim, dim)`` for the statistic and ``G.float()`` in
the PolarExpress root), and fails on float64 parameters (``lerp_`` and
``@`` refuse mixed dtypes). The port computes everything in float64.
The official ``print`` of a non-finite root is recorded in
``nonfinite_events`` instead.

Used only by the tests, as the ground truth that `foam_optax.asgo` and
`foam_optax.dasgo` must reproduce with their defaults.
"""

from __future__ import annotations

import math
from itertools import repeat

import numpy as np

# LLMmodels/config/optimizer/asgo.yaml, verbatim. Only `learning_rate` is
# passed to the optimizer by the training code (see `official_route`); the
# other values equal the class defaults, under other names
# (damping -> eps).
ASGO_YAML = dict(
    optimizer_name="asgo", learning_rate=0.01, weight_decay=0.1,
    momentum=0.9, beta2=0.8, damping=1e-10,
    inv_method="_matrix_inverse_root_PolarExpress", matalg_steps=10)

# LLMmodels/config/optimizer/dasgo.yaml, verbatim. Its learning_rate (0.01)
# is what the official runs use; the class default is 1e-3.
DASGO_YAML = dict(
    optimizer_name="dasgo", learning_rate=0.01, weight_decay=0.1,
    momentum=0.9, beta2=0.95, damping=1e-8)

# optimizers/utils/utils.py, get_optimizer_and_lr_scheduler: the optimizer
# of the parameters that `official_route` sends to Adam. Plain Adam
# (torch.optim.Adam, bias-corrected, no weight decay), the learning rate of
# the yaml, the same schedule as the matrix optimizer.
OFFICIAL_ADAM = dict(betas=(0.9, 0.95), weight_decay=0.0, eps=1e-8)

# The training loop (LLMmodels/main.py, train_config.yaml) clips the global
# gradient norm of all parameters to this before every optimizer step.
OFFICIAL_GLOBAL_CLIP = 1.0

# optimizers/utils/matrix_decom.py, _matrix_inverse_root_PolarExpress (and
# zeropower_via_PolarExpress): the listed coefficients, before the safety
# factor.
POLAR_EXPRESS_COEFFS = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),  # subsequent coeffs equal this numerically
]


def _lerp(start, end, weight):
  """``start.lerp_(end, weight)``: torch's formula, with its two branches."""
  diff = end - start
  if abs(weight) < 0.5:
    return start + weight * diff
  return end - diff * (1 - weight)


def _fro_norm(x, batched=False):
  """``x.norm()`` (2-D) or ``x.norm(dim=(-2, -1), keepdim=True)``."""
  if batched:
    return np.sqrt(np.sum(x * x, axis=(-2, -1), keepdims=True))
  return np.sqrt(np.sum(x * x))


def polar_express_coefficients(n):
  """The (a, b, c) of each of the n iterations of
  ``_matrix_inverse_root_PolarExpress``: the first seven listed triples
  divided by (1.01, 1.01**3, 1.01**5), then (1.875, -1.25, 0.375) repeated.
  With n < 8 only the first n (scaled) triples are used."""
  coeffs_list = [(a / 1.01, b / 1.01**3, c / 1.01**5)
                 for (a, b, c) in POLAR_EXPRESS_COEFFS[:-1]]
  coeffs_list = coeffs_list + [POLAR_EXPRESS_COEFFS[-1]]
  return coeffs_list[:n] + list(repeat(coeffs_list[-1], n - len(coeffs_list)))


@np.errstate(all="ignore")
def matrix_inverse_root_polar_express(G, eps, N):
  """``_matrix_inverse_root_PolarExpress(G, eps, N)`` of
  optimizers/utils/matrix_decom.py (lines 98-125): ASGO's default root.

  Coupled iteration on Y = G / s, s = 1.01 * ||G + eps*I||_F, Z = I:
  ZY = Z Y; B = b ZY + c ZY^2; Y <- a Y + Y B; Z <- a Z + B Z; returns
  Z / sqrt(s). eps enters the normaliser s only, not the matrix whose root
  is taken. The official code casts G to float32 (``G.float()``); here it
  stays float64. Works on a batch (..., d, d) as the original does."""
  G = np.asarray(G, np.float64)
  assert G.ndim >= 2
  X = G
  dim = G.shape[-1]
  I = np.eye(dim, dtype=X.dtype)
  normalize = _fro_norm(X + eps * I, batched=True) * 1.01
  Y = X / normalize
  Z = I
  hs = polar_express_coefficients(N)
  for a, b, c in hs:
    ZY = Z @ Y
    B = b * ZY + c * ZY @ ZY
    Y = a * Y + Y @ B
    Z = a * Z + B @ Z  # X <- aX + bX^3 + cX^5
  return Z / np.sqrt(normalize)


@np.errstate(all="ignore")
def matrix_inverse_root_newtonschulz(G, eps, N=100, param=(2, -1.5, 0.5)):
  """``_matrix_inverse_root_newtonschulz(G, eps, N=100, param=(2, -1.5,
  0.5))`` of optimizers/utils/matrix_decom.py (lines 73-89): the
  Newton-Schulz alternative (``inv_method='_matrix_inverse_root_newtonschulz'``;
  ``asgo`` then calls it with N = matalg_steps, 10 by default).

  Y = (G + eps*I) / (||G||_F + eps), Z = I, then N times the same coupled
  step as PolarExpress with fixed (a, b, c); returns Z / sqrt(||G||_F).
  Here eps damps the matrix and enters the normaliser, which itself has no
  eps and no 1.01. Computes in G's dtype (no cast in the original)."""
  G = np.asarray(G, np.float64)
  assert G.ndim > 1
  dim = G.shape[-1]
  a, b, c = param
  I = (np.eye(dim) if G.ndim == 2
       else np.broadcast_to(np.eye(G.shape[-1]), (len(G), dim, dim)))
  normalize = (_fro_norm(G) if G.ndim == 2
               else _fro_norm(G, batched=True).reshape(len(G), 1, 1))
  Y = (G + eps * I) / (normalize + eps)
  Z = I
  for _ in range(N):
    ZY = Z @ Y
    B = b * ZY + c * ZY @ ZY
    Y = a * Y + Y @ B
    Z = a * Z + B @ Z
  return Z / np.sqrt(normalize)


def matrix_inverse_root_svd(G, eps=None, N=None):
  """``_matrix_inverse_root_svd(G, eps=None, N=None)`` of
  optimizers/utils/matrix_decom.py (lines 91-95): U diag(s)^(-1/2) V^T from
  a thin SVD, s clamped at 0; eps and N are ignored. An exactly zero
  singular value gives inf, hence inf*0 = NaN entries (ASGO then falls back
  to the identity)."""
  G = np.asarray(G, np.float64)
  u, s, vh = np.linalg.svd(G, full_matrices=False)
  s_clip = np.clip(s, 0, None)
  with np.errstate(divide="ignore", invalid="ignore"):
    return u @ np.diag(s_clip ** -0.5) @ vh


def matrix_inverse_root_newton(A, epsilon=1e-6, N=100, tolerance=1e-6,
                               root=2):
  """``_matrix_inverse_root_newton(A, epsilon=1e-6, N=100, tolerance=1e-6,
  root=2)`` of optimizers/utils/matrix_decom.py (lines 4-71): coupled
  inverse Newton. Its damping keyword is ``epsilon``, so ``asgo``'s call
  ``self._matrix_power(precond, eps=eps, N=...)`` raises TypeError on it;
  the port keeps the signature, and so the error."""
  A = np.asarray(A, np.float64)
  iteration = 0
  dim = A.shape[0]
  alpha = -1 / root
  identity = np.eye(dim, dtype=A.dtype)
  A_ridge = A + epsilon * identity
  A_nrm = _fro_norm(A_ridge)
  z = (root + 1) / (2 * A_nrm)
  X = z ** (-alpha) * identity
  M = z * A_ridge
  error = _fro_norm(M - identity) / _fro_norm(M)
  while error > tolerance and iteration < N:
    iteration += 1
    M_p = M * alpha + (1 - alpha) * identity
    X = X @ M_p
    M = np.linalg.matrix_power(M_p, root) @ M
    error = _fro_norm(M - identity) / _fro_norm(M)
  with np.errstate(invalid="ignore"):
    if np.allclose(X, float("inf") * np.eye(len(X))):
      X = float("nan") * np.eye(len(X))
  return X


# The names that `inv_method` selects, as getattr on matrix_decom does.
INV_METHODS = {
    "_matrix_inverse_root_PolarExpress": matrix_inverse_root_polar_express,
    "_matrix_inverse_root_newtonschulz": matrix_inverse_root_newtonschulz,
    "_matrix_inverse_root_svd": matrix_inverse_root_svd,
    "_matrix_inverse_root_newton": matrix_inverse_root_newton,
}


def _rms_rescale(update, shape):
  """``update.mul_((0.2 * math.sqrt(m * n)) / (matrix_norm(update,
  'fro').item()))``: ||update||_F becomes 0.2 sqrt(m n), i.e. RMS 0.2. A
  zero update raises ZeroDivisionError (Python float division), as the
  original does."""
  norm = float(_fro_norm(update))
  return update * ((0.2 * math.sqrt(shape[0] * shape[1])) / norm)


class OfficialASGO:
  """``asgo(params, learning_rate=1e-2, momentum=0.9, weight_decay=0.1,
  beta2=0.8, eps=1e-10, inv_method='_matrix_inverse_root_PolarExpress',
  matalg_steps=10)`` of optimizers/asgo.py, one parameter group.

  `lr` is the group's learning rate; a scheduler changes it between steps
  (`official_lr`). State per parameter name: ``momentum_buffer`` (m, n),
  ``precond`` (d, d) with d = min(m, n) (d = n on a tie), ``step``."""

  def __init__(self, learning_rate=1e-2, momentum=0.9, weight_decay=0.1,
               beta2=0.8, eps=1e-10,
               inv_method="_matrix_inverse_root_PolarExpress",
               matalg_steps=10):
    self._matrix_power = INV_METHODS[inv_method]
    self.matalg_steps = matalg_steps
    self.lr = learning_rate
    self.group = dict(beta2=beta2, eps=eps, momentum=momentum,
                      weight_decay=weight_decay)
    self.state = {}
    self.nonfinite_events = []   # (name, state step) of each identity fallback

  def inverse_precond(self, precond, name=None, step=None):
    """asgo.py lines 61-66: the root, the identity when it is not finite,
    and the assertion that it is not all zeros."""
    inverse_precond = self._matrix_power(precond, eps=self.group["eps"],
                                         N=self.matalg_steps)
    if np.isnan(inverse_precond).any() or np.isinf(inverse_precond).any():
      # The original prints "[WARNING] Step {step}: NaN/Inf detected ..."
      self.nonfinite_events.append((name, step))
      inverse_precond = np.eye(precond.shape[0])
    assert not np.allclose(inverse_precond, np.zeros_like(inverse_precond),
                           rtol=1e-5, atol=1e-8), "Inverse precond is all zeros"
    return inverse_precond

  def step(self, params, grads):
    """One ``optimizer.step()`` (asgo.py lines 33-77); returns the new
    parameters as a dict."""
    momentum = self.group["momentum"]
    beta2 = self.group["beta2"]
    wd = self.group["weight_decay"]
    new_params = {}
    for name, p in params.items():
      p = np.asarray(p, np.float64)
      new_params[name] = p
      state = self.state.setdefault(name, {})
      if grads.get(name) is None:
        continue
      grad = np.asarray(grads[name], np.float64)
      assert grad.ndim >= 2, (
          "1D parameter and embedding should be handled by AdamW")
      if grad.ndim == 2:
        m, n = grad.shape
        if len(state) == 0:
          dim = m if m < n else n
          state["momentum_buffer"] = np.zeros_like(grad)
          state["precond"] = np.zeros((dim, dim))
          state["step"] = 0
        state["momentum_buffer"] = _lerp(state["momentum_buffer"], grad,
                                         1 - momentum)
        precond_tmp = grad @ grad.T if m < n else grad.T @ grad
        state["precond"] = _lerp(state["precond"], precond_tmp, 1 - beta2)
        inverse_precond = self.inverse_precond(state["precond"], name,
                                               state["step"])
        update = (inverse_precond @ state["momentum_buffer"] if m < n
                  else state["momentum_buffer"] @ inverse_precond)
        update = _rms_rescale(update, grad.shape)
        state["step"] += 1
      else:
        raise ValueError("Missing Training Param")
      if wd > 0:
        p = p * (1 - self.lr * wd)
      p = p + (-self.lr) * update
      new_params[name] = p
    return new_params


class OfficialDASGO:
  """``dasgo(params, learning_rate=1e-3, momentum=0.9, weight_decay=0.1,
  beta2=0.95, eps=1e-8)`` of optimizers/dasgo.py, one parameter group.

  State per parameter name: ``momentum_buffer`` (m, n), ``precond`` (n,)
  (always the input side, whatever the shape), ``step``."""

  def __init__(self, learning_rate=1e-3, momentum=0.9, weight_decay=0.1,
               beta2=0.95, eps=1e-8):
    self.lr = learning_rate
    self.group = dict(beta2=beta2, eps=eps, momentum=momentum,
                      weight_decay=weight_decay)
    self.state = {}

  def step(self, params, grads):
    """One ``optimizer.step()`` (dasgo.py lines 27-55); returns the new
    parameters as a dict."""
    eps = self.group["eps"]
    momentum = self.group["momentum"]
    lr = self.lr
    beta2 = self.group["beta2"]
    wd = self.group["weight_decay"]
    new_params = {}
    for name, p in params.items():
      p = np.asarray(p, np.float64)
      new_params[name] = p
      state = self.state.setdefault(name, {})
      if grads.get(name) is None:
        continue
      grad = np.asarray(grads[name], np.float64)
      assert grad.ndim >= 2, (
          "1D parameter and embedding should be handled by AdamW")
      if grad.ndim != 2:
        # The original reaches `state['precond'].lerp_(...)` with a (n,)
        # state and a grad.shape[1:] sum, which torch refuses in place.
        raise RuntimeError(
            "dasgo supports 2-D parameters only (the official in-place lerp "
            "fails on a higher-rank gradient)")
      if len(state) == 0:
        dim = grad.shape[1]
        state["momentum_buffer"] = np.zeros_like(grad)
        state["precond"] = np.zeros(dim)
        state["step"] = 0
      state["momentum_buffer"] = _lerp(state["momentum_buffer"], grad,
                                       1 - momentum)
      state["precond"] = _lerp(state["precond"],
                               np.sum(grad * grad, axis=0), 1 - beta2)
      state["step"] += 1
      update = state["momentum_buffer"] * (state["precond"] + eps) ** -0.5
      # Do the RMS norm scaling
      update = _rms_rescale(update, grad.shape)
      if wd > 0:
        p = p * (1 - wd * lr)
      p = p + (-self.lr) * update
      new_params[name] = p
    return new_params


def official_route(name, ndim):
  """``get_optimizer_and_lr_scheduler`` (optimizers/utils/utils.py lines
  66-77): 'adam' for a parameter whose name contains 'emb' (any case) or
  that is 1-D, else the matrix optimizer ('asgo'/'dasgo'). The optimizer is
  then built with ``learning_rate=cfg.optimizer.learning_rate`` only, every
  other argument at its class default; Adam gets `OFFICIAL_ADAM`."""
  if "emb" in name.lower() or ndim == 1:
    return "adam"
  return "matrix"


def official_lr(k, total_steps, learning_rate):
  """The learning rate of the (k+1)-th optimizer step (k scheduler steps
  taken before it) under ``get_lr_scheduler`` (optimizers/utils/utils.py
  lines 51-64): LinearLR from learning_rate / W to learning_rate over
  W = total_steps // 10 steps, then CosineAnnealingLR with T_max =
  total_steps - W down to eta_min = 0.02 * learning_rate (closed forms of
  torch's recursive updates)."""
  warmup_steps = total_steps // 10
  start_factor = 1.0 / warmup_steps
  if k < warmup_steps:
    return learning_rate * (start_factor
                            + (1.0 - start_factor) * k / warmup_steps)
  eta_min = 0.02 * learning_rate
  t_max = total_steps - warmup_steps
  t = k - warmup_steps
  return eta_min + (learning_rate - eta_min) * (
      1 + math.cos(math.pi * t / t_max)) / 2
