"""Independent float64 NumPy reference of SPEC sections 1-3.

Dense, per block, plain loops: written from the specification (and the
library's documented choices for what the SPEC leaves open), never from the
library's code. The shaping rules followed are the documented ones:

* size-1 dims squeezed; rank 0 (or zero-size) leaves: grafting only; rank 1:
  grafting only unless ``precondition_1d`` (then a ``1 x n`` matrix); rank >= 3:
  leading ``k`` dims merged into rows, ``k`` minimising the larger side (ties:
  the later split);
* blocks of at most ``block_size`` per side, the last one smaller;
* a matrix side longer than ``max_precond_dim`` and a block side of length 1
  get no factor (identity);
* eigenvalues in descending order; power-QR orders the previous basis by its
  Rayleigh quotients (descending, stable) before one step ``qr(A Q)``, and the
  rotated second moment follows that permutation; the first basis of every
  factor is a fresh ``eigh``;
* eigenvalue-corrected: the official SOAP's step size ``sqrt(1-b2^t)/(1-b1^t)``
  with ``sqrt(V) + eps`` (also for Adam on leaves without factors);
  ``rotation_basis='previous'`` rotates with the bases before this step's
  statistics (updated and refreshed after the step), and
  ``first_step='init_only'`` makes the first step only accumulate and
  decompose, the bias corrections and check schedule counting from the
  second gradient.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULTS = dict(
    b1=0.95, b2=0.995, epsilon=1e-9, max_epsilon=3e-7, threshold=0.75,
    check_frequency=20, exponent=2, block_size=1024, max_precond_dim=None,
    start_preconditioning_step=None, grafting="adam", graft_b2=0.995,
    graft_eps=1e-9, controller="foam", residual_tol=0.1,
    precondition_1d=False, preconditioner="root_inverse",
    refresh_method="eigh", rotation_basis="updated", first_step="update",
    statistics_compute_steps=1)


# ----------------------------------------------------------------- shaping

def matrix_shape(shape, precondition_1d):
  if any(d == 0 for d in shape):
    return None
  dims = [d for d in shape if d != 1]
  if not dims:
    return None
  if len(dims) == 1:
    return (1, dims[0]) if precondition_1d else None
  if len(dims) == 2:
    return (dims[0], dims[1])
  best = None
  for k in range(1, len(dims)):
    cand = (math.prod(dims[:k]), math.prod(dims[k:]))
    if best is None or max(cand) <= max(best):
      best = cand
  return best


def cuts(size, block_size):
  """[(start, length)] of the blocks along one side."""
  if block_size is None:
    return [(0, size)]
  return [(s, min(block_size, size - s)) for s in range(0, size, block_size)]


# ----------------------------------------------------------------- linalg

def eigh_desc(a):
  a = 0.5 * (a + a.T)
  d, q = np.linalg.eigh(a)
  return q[:, ::-1].copy(), np.maximum(d[::-1], 0.0)


def inverse_root(q, d, eps, p):
  return (q * (d + eps) ** (-1.0 / p)) @ q.T


def staleness_proxy(a, q, d, eps, p):
  """h = RC * alpha / p (SPEC 2.2)."""
  s = d + eps
  rc = np.linalg.norm((q.T @ a @ q - np.diag(d)) / np.sqrt(np.outer(s, s)))
  w = s ** (-1.0 / p)
  return rc * w.max() / np.linalg.norm(w) / p


def is_check(t, s0, f, offset=0):
  return t == s0 or (t > s0 and (t + offset) % f == 0)


# ----------------------------------------------------------------- factors

class Factor:
  """One Kronecker factor of one block."""

  def __init__(self, size, eps0):
    self.stat = np.zeros((size, size))
    self.q = np.eye(size)
    self.d = np.zeros(size)
    self.eps = eps0
    self.proxy = 0.0
    self.checks = 0
    self.refreshes = 0
    self.margins = []   # |log| of each decision's ratio to its threshold

  def step(self, gram, t, c):
    """Accumulates; on a check step runs the controller. Returns the column
    permutation of the new basis relative to the old one (or None)."""
    b2, k = c["b2"], c["statistics_compute_steps"]
    if (t - 1) % k == 0:   # statistics on steps 1, 1 + k, 1 + 2k, ...
      self.stat = b2 * self.stat + (1 - b2) * gram
    a = self.stat / (1 - b2 ** math.ceil(t / k))
    if not is_check(t, c["s0"], c["check_frequency"], c["offset"]):
      return None
    eps0, p = c["epsilon"], c["exponent"]
    first = self.checks == 0
    self.checks += 1
    kind = c["controller"]
    if first:
      refresh, proxy = True, 0.0
    elif kind == "stale":
      refresh, proxy = True, 0.0
    elif kind in ("foam", "foam_no_refresh"):
      eps_c = max(eps0, self.eps)
      proxy = staleness_proxy(a, self.q, self.d, eps_c, p)
      eps_n = max(eps0, eps_c * proxy / c["threshold"])
      if kind == "foam":
        refresh = eps_n > c["max_epsilon"]
        self.margins.append(abs(math.log(eps_n / c["max_epsilon"])))
      else:
        refresh, eps_n = False, min(eps_n, c["max_epsilon"])
      if not refresh:
        self.eps = eps_n
    elif kind == "foam_fixed_damping":
      proxy = staleness_proxy(a, self.q, self.d, eps0, p)
      refresh = proxy > c["threshold"]
      self.margins.append(abs(math.log(proxy / c["threshold"])))
      self.eps = eps0
    elif kind == "residual":
      b = self.q.T @ a @ self.q
      off = np.linalg.norm(b - np.diag(np.diag(b)))
      proxy = off / np.linalg.norm(b)
      refresh = off > c["residual_tol"] * np.linalg.norm(b)
      if c["residual_tol"] > 0:
        self.margins.append(
            abs(math.log(max(off, 1e-300) /
                         (c["residual_tol"] * np.linalg.norm(b)))))
      if not refresh:
        self.d = np.maximum(np.diag(b), 0.0)
        self.eps = eps0
    else:
      raise ValueError(kind)
    self.proxy = proxy
    if not refresh:
      return None
    self.refreshes += 1
    self.eps = eps0
    if c["refresh_method"] == "power_qr" and not first:
      est = np.diag(self.q.T @ a @ self.q)
      order = np.argsort(-est, kind="stable")
      self.q, _ = np.linalg.qr(a @ self.q[:, order])
      self.d = np.maximum(est[order], 0.0)
      return order
    self.q, self.d = eigh_desc(a)
    return None

  def inverse_root(self, p):
    return inverse_root(self.q, self.d, self.eps, p)


class Block:

  def __init__(self, r0, m, c0, n, left, right, c):
    self.rows = slice(r0, r0 + m)
    self.cols = slice(c0, c0 + n)
    self.r0, self.c0 = r0, c0
    self.left = Factor(m, c["epsilon"]) if left else None
    self.right = Factor(n, c["epsilon"]) if right else None
    self.v = np.zeros((m, n))   # rotated second moment (SPEC 3)


class Leaf:

  def __init__(self, shape, c):
    self.shape = tuple(shape)
    self.momentum = np.zeros(shape)
    self.graft_v = np.zeros(shape)
    self.mshape = matrix_shape(self.shape, c["precondition_1d"])
    self.blocks = []
    if self.mshape is None:
      return
    rows, cols = self.mshape
    mp = c["max_precond_dim"]
    left_ok = mp is None or rows <= mp
    right_ok = mp is None or cols <= mp
    for r0, m in cuts(rows, c["block_size"]):
      for c0, n in cuts(cols, c["block_size"]):
        self.blocks.append(Block(r0, m, c0, n, left_ok and m > 1,
                                 right_ok and n > 1, c))

  @property
  def preconditioned(self):
    return any(b.left is not None or b.right is not None for b in self.blocks)


def _norm(x):
  return np.sqrt(np.sum(x * x))


class Reference:
  """Dense float64 reference of `scale_by_foam` with `stagger=False`."""

  def __init__(self, shapes, **kwargs):
    unknown = set(kwargs) - set(DEFAULTS)
    if unknown:
      raise TypeError(unknown)
    c = dict(DEFAULTS, **kwargs)
    s0 = c["start_preconditioning_step"]
    c["s0"] = c["check_frequency"] if s0 is None else s0
    c["offset"] = -1 if c["first_step"] == "init_only" else 0
    self.c = c
    self.t = 0
    self.leaves = [Leaf(s, c) for s in shapes]

  def factors(self):
    """{(leaf, row_start, col_start, side): Factor}, side 'L' or 'R'."""
    out = {}
    for i, leaf in enumerate(self.leaves):
      for b in leaf.blocks:
        for side, f in (("L", b.left), ("R", b.right)):
          if f is not None:
            out[(i, b.r0, b.c0, side)] = f
    return out

  def stats(self):
    fs = list(self.factors().values())
    eps = [f.eps for f in fs]
    return dict(
        eigendecompositions=sum(f.refreshes for f in fs),
        checks=sum(f.checks for f in fs),
        damping_max=max(eps) if eps else 0.0,
        damping_mean=float(np.mean(eps)) if eps else 0.0,
        proxy_max=max((f.proxy for f in fs), default=0.0))

  def update(self, grads):
    self.t += 1
    return [self._leaf(np.asarray(g, np.float64), leaf)
            for g, leaf in zip(grads, self.leaves)]

  def _graft(self, g, m, leaf, t):
    c = self.c
    kind = c["grafting"]
    if kind in ("sgd", "none"):
      return m
    # In eigenvalue-corrected mode a leaf without a factor runs the
    # eigenbasis Adam in the identity basis: its decay is b2.
    corrected = c["preconditioner"] == "eigenvalue_corrected"
    b2 = c["b2"] if corrected and kind == "adam" else c["graft_b2"]
    leaf.graft_v = b2 * leaf.graft_v + (1 - b2) * g * g
    v = leaf.graft_v
    if kind == "adam" and corrected:
      return m * np.sqrt(1 - b2 ** t) / (np.sqrt(v) + c["graft_eps"])
    if kind == "adam":
      v = v / (1 - c["graft_b2"] ** t)
    return m / (np.sqrt(v) + c["graft_eps"])

  def _leaf(self, g, leaf):
    c, t = self.c, self.t
    g = g.reshape(leaf.shape)
    corrected = c["preconditioner"] == "eigenvalue_corrected"
    if c["first_step"] == "init_only":
      if t == 1:   # statistics and first bases only
        gm = g.reshape(leaf.mshape) if leaf.preconditioned else None
        for b in leaf.blocks:
          gb = gm[b.rows, b.cols]
          for f, gram in ((b.left, gb @ gb.T), (b.right, gb.T @ gb)):
            if f is not None:
              f.step(gram, t, c)
        return np.zeros(leaf.shape)
      ta = t - 1   # Adam's step counts from the second gradient
    else:
      ta = t
    leaf.momentum = c["b1"] * leaf.momentum + (1 - c["b1"]) * g
    m = leaf.momentum / (1 - c["b1"] ** ta)
    if not leaf.preconditioned:
      return self._graft(g, m, leaf, ta)
    a = None if corrected else self._graft(g, m, leaf, ta)
    gm, mm = g.reshape(leaf.mshape), m.reshape(leaf.mshape)
    am = None if a is None else a.reshape(leaf.mshape)
    out = np.zeros(leaf.mshape)
    for b in leaf.blocks:
      gb, mb = gm[b.rows, b.cols], mm[b.rows, b.cols]
      if corrected:
        after = c["rotation_basis"] == "previous"
        if not after:
          self._step_factors(b, gb, t)
        ql = np.eye(gb.shape[0]) if b.left is None else b.left.q
        qr = np.eye(gb.shape[1]) if b.right is None else b.right.q
        gt = ql.T @ gb @ qr
        b.v = c["b2"] * b.v + (1 - c["b2"]) * gt * gt
        scale = np.sqrt(1 - c["b2"] ** ta)
        out[b.rows, b.cols] = ql @ (
            (ql.T @ mb @ qr) * scale / (np.sqrt(b.v) + c["graft_eps"])) @ qr.T
        if after:
          self._step_factors(b, gb, t)
        continue
      for f, gram in ((b.left, gb @ gb.T), (b.right, gb.T @ gb)):
        if f is not None:
          f.step(gram, t, c)
      p = mb
      if b.left is not None:
        p = b.left.inverse_root(c["exponent"]) @ p
      if b.right is not None:
        p = p @ b.right.inverse_root(c["exponent"])
      if c["grafting"] != "none":
        p = p * _norm(am[b.rows, b.cols]) / (_norm(p) + 1e-300)
      out[b.rows, b.cols] = p
    out = out.reshape(leaf.shape)
    if not corrected and t < c["s0"]:
      return a
    return out

  def _step_factors(self, b, gb, t):
    """Both factors of a block; the rotated second moment follows their
    reordered columns."""
    for k, (f, gram) in enumerate(((b.left, gb @ gb.T), (b.right, gb.T @ gb))):
      if f is not None:
        order = f.step(gram, t, self.c)
        if order is not None:
          b.v = b.v[order, :] if k == 0 else b.v[:, order]
