"""A float64 NumPy port of the official bias-corrected optimizers.

Ported from github.com/fastino-ai/preconditioner-bias-correction at 4e722e9,
each optimizer together with the part of its trainer that fills the
per-parameter buffers it reads:

* `OfficialLOOAdamW`: ``collectors/loo_hybrid.py`` (``collect_loo_hybrid``,
  the dense set, with ``jensen_correction``) and
  ``optimizers/adamw_loo.py`` (``LOOBCAdamW.step``): the paper's headline
  run, ``scripts/pretrain/adamw_loo_jensen.sh``.
* `OfficialBiasCorrectedAdamW`: ``optimizers/adamw.py``
  (``BiasCorrectedAdamW.step``) in mode ``full``: ``_g_for_m`` the mean of
  group A (the first half of the microbatches), ``_v_step`` the mean
  square of group B (the second half), ``_g_sq_micro`` group B's squares.
* `OfficialBiasCorrectedShampoo`: ``optimizers/shampoo.py``
  (``BiasCorrectedShampoo._step_shampoo``) in mode ``full`` on its root
  steps (``step % shampoo_root_freq == 0``, counting steps from 0):
  ``_g_A`` group A's mean, ``_S_L_step`` / ``_S_R_step`` the mean over
  group B of ``G_j G_jᵀ`` / ``G_jᵀ G_j``, and the lists of those for the
  variance. Matrices only (the official class routes the others to its
  AdamW path).

Each ``step(params, micro)`` takes the parameters and the microbatch
gradients (leaves with a leading microbatch axis) and returns the new
parameters.
"""

import numpy as np


class OfficialLOOAdamW:

  def __init__(self, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01,
               jensen_correction=True):
    self.lr, (self.beta1, self.beta2) = lr, betas
    self.eps, self.wd, self.jensen = eps, weight_decay, jensen_correction
    self.state = {}

  def step(self, params, micro):
    out = {}
    for name, p in params.items():
      g = np.asarray(micro[name], np.float64)
      m_count = g.shape[0]
      st = self.state.setdefault(name, {"step": 0, "exp_avg": np.zeros_like(
          g[0]), "exp_avg_sq": np.zeros_like(g[0])})
      step_t = st["step"] + 1
      bc1, bc2 = 1 - self.beta1 ** step_t, 1 - self.beta2 ** step_t
      # Pass 1: the full-batch mean.
      g_full = np.zeros_like(g[0])
      for r in range(m_count):
        g_full = g_full + g[r] / m_count
      # Pass 2: the folds.
      u_first = np.zeros_like(g_full)
      u_third = np.zeros_like(g_full)
      denoms = []
      for r in range(m_count):
        g_neg_r = (m_count * g_full - g[r]) / (m_count - 1)
        v_hat = np.maximum((self.beta2 * st["exp_avg_sq"]
                            + (1 - self.beta2) * g_neg_r * g_neg_r) / bc2, 0.0)
        denom_r = np.sqrt(v_hat) + self.eps
        m_r_hat = (self.beta1 * st["exp_avg"] + (1 - self.beta1) * g[r]) / bc1
        u_first += (m_r_hat / denom_r) / m_count
        u_third += (m_r_hat / denom_r ** 3) / m_count
        denoms.append(denom_r)
      if self.jensen and m_count >= 2:
        var_p = np.maximum(np.var(np.stack(denoms), axis=0, ddof=1), 0.0)
        u_corrected = u_first - var_p * u_third
        u_total = np.where(u_corrected * u_first >= 0, u_corrected, 0.0)
      else:
        u_total = u_first
      # LOOBCAdamW.step.
      st["step"] = step_t
      p = np.asarray(p, np.float64)
      if self.wd != 0:
        p = p * (1 - self.lr * self.wd)
      out[name] = p - self.lr * u_total
      st["exp_avg"] = self.beta1 * st["exp_avg"] + (1 - self.beta1) * g_full
      st["exp_avg_sq"] = (self.beta2 * st["exp_avg_sq"]
                          + (1 - self.beta2) * g_full * g_full)
    return out


class OfficialBiasCorrectedAdamW:

  def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    self.lr, (self.beta1, self.beta2) = lr, betas
    self.eps, self.wd = eps, weight_decay
    self.state = {}

  def step(self, params, micro):
    out = {}
    for name, p in params.items():
      g = np.asarray(micro[name], np.float64)
      half = g.shape[0] // 2
      g_for_m = g[:half].mean(axis=0)
      v_step = (g[half:] ** 2).mean(axis=0)
      g_sq_micro = [g[j] ** 2 for j in range(half, g.shape[0])]
      st = self.state.setdefault(name, {"step": 0, "exp_avg": np.zeros_like(
          g[0]), "exp_avg_sq": np.zeros_like(g[0])})
      st["step"] += 1
      t = st["step"]
      p = np.asarray(p, np.float64)
      if self.wd != 0:
        p = p * (1 - self.lr * self.wd)
      bc2 = 1 - self.beta2 ** t
      v = st["exp_avg_sq"]
      p_js = [np.sqrt(np.maximum((self.beta2 * v + (1 - self.beta2) * g_sq)
                                 / bc2, 0.0)) for g_sq in g_sq_micro]
      mcount = len(p_js)
      var_bar_p = np.maximum(np.var(np.stack(p_js), axis=0, ddof=1) / mcount,
                             0.0)
      st["exp_avg"] = self.beta1 * st["exp_avg"] + (1 - self.beta1) * g_for_m
      st["exp_avg_sq"] = self.beta2 * v + (1 - self.beta2) * v_step
      m_hat = st["exp_avg"] / (1 - self.beta1 ** t)
      v_hat = st["exp_avg_sq"] / bc2
      denom = np.sqrt(v_hat) + self.eps
      inv = np.maximum(1.0 / denom - var_bar_p / denom ** 3, 0.0)
      out[name] = p - self.lr * (m_hat * inv)
    return out


def _variance_along_eigenbasis(m_prev, s_micro, beta2, damping, q):
  """``BiasCorrectedShampoo._variance_along_eigenbasis``."""
  eye = np.eye(q.shape[0])
  ells = np.stack([np.sum(q * ((beta2 * m_prev + (1 - beta2) * s_j
                                + damping * eye) @ q), axis=0)
                   for s_j in s_micro])
  m = len(s_micro)
  var = ((ells - ells.mean(axis=0)) ** 2).sum(axis=0) / (m * (m - 1))
  return np.maximum(var, 0.0)


class OfficialBiasCorrectedShampoo:

  def __init__(self, lr=1e-3, weight_decay=0.01, shampoo_beta1=0.9,
               shampoo_beta2=0.95, shampoo_damping=1e-6, shampoo_root_freq=10):
    self.lr, self.wd = lr, weight_decay
    self.beta1, self.beta2 = shampoo_beta1, shampoo_beta2
    self.damping, self.root_freq = shampoo_damping, shampoo_root_freq
    self.state = {}
    self.global_step = 0   # the trainer's step, from 0

  def step(self, params, micro):
    do_hessian = self.global_step % self.root_freq == 0
    self.global_step += 1
    out = {}
    for name, p in params.items():
      g = np.asarray(micro[name], np.float64)
      half = g.shape[0] // 2
      g_a, group_b = g[:half].mean(axis=0), g[half:]
      d1, d2 = g.shape[1:]
      st = self.state.setdefault(name, {
          "M": np.zeros((d1, d2)), "L": np.zeros((d1, d1)),
          "R": np.zeros((d2, d2)), "P_L": None, "P_R": None})
      p = np.asarray(p, np.float64)
      if self.wd != 0:
        p = p * (1 - self.lr * self.wd)
      st["M"] = self.beta1 * st["M"] + (1 - self.beta1) * g_a
      if do_hessian:
        s_l_micro = [gj @ gj.T for gj in group_b]
        s_r_micro = [gj.T @ gj for gj in group_b]
        l_prev, r_prev = st["L"].copy(), st["R"].copy()
        st["L"] = (self.beta2 * st["L"]
                   + (1 - self.beta2) * np.mean(s_l_micro, axis=0))
        st["R"] = (self.beta2 * st["R"]
                   + (1 - self.beta2) * np.mean(s_r_micro, axis=0))
        roots = []
        for stat, prev, s_micro in ((st["L"], l_prev, s_l_micro),
                                    (st["R"], r_prev, s_r_micro)):
          eigvals, q = np.linalg.eigh(stat + self.damping * np.eye(len(stat)))
          eigvals = np.maximum(eigvals, self.damping * 1e-3)
          var = _variance_along_eigenbasis(prev, s_micro, self.beta2,
                                           self.damping, q)
          d = np.maximum(eigvals ** -0.25 - (5.0 / 32.0) * eigvals ** -2.25
                         * var, 0.0)
          roots.append((q * d[None, :]) @ q.T)
        st["P_L"], st["P_R"] = roots
      if st["P_L"] is None:
        update = st["M"]
      else:
        update = st["P_L"] @ st["M"] @ st["P_R"]
      out[name] = p - self.lr * update
    return out
