"""A float64 NumPy port of the official ASGO and DASGO optimizers.

Ported from github.com/infinity-stars/ASGO at d3ef14b:

* ``optimizers/asgo.py`` (class ``asgo``),
* ``optimizers/dasgo.py`` (class ``dasgo``),
* ``optimizers/utils/matrix_decom.py`` (``_matrix_inverse_root_PolarExpress``
  and ``_matrix_inverse_root_newtonschulz``).

Parameters and gradients are in torch's ``(out, in)`` layout, as the
official code sees them; a JAX ``(in, out)`` kernel is their transpose. The
constructor defaults are the classes' own, which are what the official runs
use: ``LLMmodels/utils`` builds ``asgo(params, learning_rate=lr)`` and
``dasgo(params, learning_rate=lr)``, passing nothing else from the yaml.
"""

import itertools
import math

import numpy as np

_POLAR_EXPRESS = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
]


def polar_express_inverse_root(g, eps, n):
  """``_matrix_inverse_root_PolarExpress(G, eps, N)``."""
  coeffs = [(a / 1.01, b / 1.01 ** 3, c / 1.01 ** 5)
            for a, b, c in _POLAR_EXPRESS[:-1]] + [_POLAR_EXPRESS[-1]]
  x = np.asarray(g, np.float64)
  eye = np.eye(x.shape[-1])
  normalize = np.linalg.norm(x + eps * eye) * 1.01
  y, z = x / normalize, eye
  steps = coeffs[:n] + list(itertools.repeat(coeffs[-1], n - len(coeffs)))
  for a, b, c in steps:
    zy = z @ y
    poly = b * zy + c * zy @ zy
    y = a * y + y @ poly
    z = a * z + poly @ z
  return z / np.sqrt(normalize)


def newton_schulz_inverse_root(g, eps, n=100, param=(2, -1.5, 0.5)):
  """``_matrix_inverse_root_newtonschulz(G, eps, N, param)``."""
  a, b, c = param
  eye = np.eye(g.shape[-1])
  normalize = np.linalg.norm(g)
  y, z = (g + eps * eye) / (normalize + eps), eye
  for _ in range(n):
    zy = z @ y
    poly = b * zy + c * zy @ zy
    y = a * y + y @ poly
    z = a * z + poly @ z
  return z / np.sqrt(normalize)


_INVERSE_ROOTS = {"_matrix_inverse_root_PolarExpress": polar_express_inverse_root,
                  "_matrix_inverse_root_newtonschulz": newton_schulz_inverse_root}


class OfficialASGO:
  """``optimizers/asgo.py``: ``asgo.step`` for 2-D parameters."""

  def __init__(self, learning_rate=1e-2, momentum=0.9, weight_decay=0.1,
               beta2=0.8, eps=1e-10,
               inv_method="_matrix_inverse_root_PolarExpress",
               matalg_steps=10):
    self.lr, self.momentum, self.wd = learning_rate, momentum, weight_decay
    self.beta2, self.eps = beta2, eps
    self.matrix_power = _INVERSE_ROOTS[inv_method]
    self.steps = matalg_steps
    self.state = {}
    self.fallbacks = 0

  def step(self, params, grads):
    out = {}
    for name, p in params.items():
      grad = np.asarray(grads[name], np.float64)
      assert grad.ndim == 2, "1-D parameters go to Adam"
      m, n = grad.shape
      # The factor is on the smaller side; GᵀG (the input side) on a tie.
      state = self.state.setdefault(name, {
          "momentum_buffer": np.zeros_like(grad),
          "precond": np.zeros((min(m, n),) * 2)})
      # lerp_(grad, 1 - momentum): buf + (1 - momentum) (grad - buf).
      state["momentum_buffer"] += (1 - self.momentum) * (
          grad - state["momentum_buffer"])
      gram = grad @ grad.T if m < n else grad.T @ grad
      state["precond"] += (1 - self.beta2) * (gram - state["precond"])
      root = self.matrix_power(state["precond"], eps=self.eps, n=self.steps)
      if not np.all(np.isfinite(root)):
        self.fallbacks += 1
        root = np.eye(root.shape[0])
      update = (root @ state["momentum_buffer"] if m < n
                else state["momentum_buffer"] @ root)
      update = update * (0.2 * math.sqrt(m * n)) / np.linalg.norm(update)
      p = np.asarray(p, np.float64)
      if self.wd > 0:
        p = p * (1 - self.lr * self.wd)
      out[name] = p - self.lr * update
    return out


class OfficialDASGO:
  """``optimizers/dasgo.py``: ``dasgo.step`` for 2-D parameters."""

  def __init__(self, learning_rate=1e-3, momentum=0.9, weight_decay=0.1,
               beta2=0.95, eps=1e-8):
    self.lr, self.momentum, self.wd = learning_rate, momentum, weight_decay
    self.beta2, self.eps = beta2, eps
    self.state = {}

  def step(self, params, grads):
    out = {}
    for name, p in params.items():
      grad = np.asarray(grads[name], np.float64)
      assert grad.ndim == 2, "1-D parameters go to Adam"
      state = self.state.setdefault(name, {
          "momentum_buffer": np.zeros_like(grad),
          "precond": np.zeros(grad.shape[1])})
      state["momentum_buffer"] += (1 - self.momentum) * (
          grad - state["momentum_buffer"])
      state["precond"] += (1 - self.beta2) * (
          np.sum(grad * grad, axis=0) - state["precond"])
      update = state["momentum_buffer"] * (state["precond"] + self.eps) ** -0.5
      update = update * (0.2 * math.sqrt(grad.size)) / np.linalg.norm(update)
      p = np.asarray(p, np.float64)
      if self.wd > 0:
        p = p * (1 - self.wd * self.lr)
      out[name] = p - self.lr * update
    return out
