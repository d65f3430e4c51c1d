"""The official bias-corrected AdamW and Shampoo, ported to NumPy float64.

Source: https://github.com/fastino-ai/preconditioner-bias-correction at commit
4e722e92499276d1fcadb3b7650017244f5b54eb ("Add LICENSE", 2026-05-20), the
PyTorch reference code of Nayak et al., "Correcting Stochastic Update Bias in
Preconditioned Language Model Optimizers". Files ported (paths under
``src/bcopt/``):

- ``optimizers/adamw.py``: `BiasCorrectedAdamW` (modes std / cf / inv / full);
- ``optimizers/adamw_loo.py``: `LOOBCAdamW` (leave-one-out, the headline run);
- ``collectors/loo_hybrid.py``: `make_collect_loo_hybrid` (the LOO folds and
  the Jensen correction, computed outside the optimizer);
- ``collectors/full_post_ema.py``: the streaming collectors of full and inv;
- ``trainers/adamw_sft.py``: `collect_and_populate_streaming` (std, cf);
- ``trainers/adamw_pretrain.py``, ``trainers/adamw_pretrain_loo.py``: the
  step order (collect, clip, step);
- ``optimizers/shampoo.py``: `BiasCorrectedShampoo` and its AdamW fallback;
- ``optimizers/shampoo_streaming.py``: `BiasCorrectedShampooStreaming`,
  `populate_buffers_streaming`;
- ``optimizers/shampoo_two_pass.py``: `BiasCorrectedShampooTwoPass`,
  `pass1_collect_step`, `finalize_and_populate_step`;
- ``trainers/shampoo_sft.py``: `collect_per_step`, `populate_buffers`;
- ``trainers/shampoo_pretrain.py``: the step order and refresh schedule.

The official optimizers do not see microbatches: a trainer-side collector runs
one backward pass per microbatch, reduces the gradients to the buffers the
optimizer pops (``state['_g_for_m']``, ``state['_u_total']``, ...), clips
``p.grad`` with ``torch.nn.utils.clip_grad_norm_(params, 1.0)`` and calls
``optimizer.step()``. Each class below bundles the three, so that
``step(params, microbatch_grads)`` is one trainer step: ``params`` is a dict of
arrays, ``microbatch_grads`` a dict of the same keys whose arrays carry a
leading microbatch axis (microbatch ``k`` is the ``k``-th backward pass of the
official loop; a second pass over the same microbatch returns the same
gradient, so the two-pass collectors read the array again). Only the tensor
library changes: ``x.mul_(a).add_(y, alpha=b)`` -> ``x = a * x + b * y``,
``torch.linalg.eigh`` -> ``np.linalg.eigh``; every ``.to(torch.float32)`` and
float32 state buffer of the original is float64 here. ``p.grad`` is the dict
``self.grads``; where the official trainer sets ``p.grad`` to the same tensor
as an optimizer buffer, the port stores the same array, so that the in-place
clip reaches that buffer and only that buffer, as in the original.

``max_grad_norm`` is the trainers' hard-coded ``clip_grad_norm_(params, 1.0)``
(``None`` skips the call). The learning rate is the attribute ``lr`` (the
trainers drive it with a cosine schedule).

Used only by the tests, as the ground truth for `foam_optax`'s bias-corrected
optimizers.
"""

from __future__ import annotations

import numpy as np

_SPARSE_NAME_PATTERNS = ("embed_tokens", "lm_head")


def clip_grad_norm_(grads, max_norm):
  """`torch.nn.utils.clip_grad_norm_(params, max_norm)` with norm_type 2:
  every gradient is scaled in place by min(1, max_norm / (total + 1e-6))."""
  grads = [g for g in grads if g is not None]
  if not grads:
    return 0.0
  total_norm = np.linalg.norm(np.array([np.linalg.norm(g) for g in grads]))
  clip_coef = max_norm / (total_norm + 1e-6)
  clip_coef_clamped = min(clip_coef, 1.0)
  for g in grads:
    g *= clip_coef_clamped
  return total_norm


def _as_float64(tree):
  return {k: np.array(v, np.float64) for k, v in tree.items()}


# --------------------------------------------------------------------------
# AdamW: the A/B (two-group) form
# --------------------------------------------------------------------------


class BiasCorrectedAdamW:
  """`BiasCorrectedAdamW` (optimizers/adamw.py:40-170), fed by the streaming
  collectors that `trainers/adamw_pretrain.py` runs with ``--stream_grads``.

  ``mode`` (a trainer argument there) chooses the buffers:
    std  : m from the mean of all microbatches, v from its square;
    cf   : m from group A (first half), v from the mean over group B (second
           half) of g_j**2;
    inv  : as std, plus Var(bar p) over all microbatches (no cross-fit);
    full : as cf, plus Var(bar p) over group B.
  """

  def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
               weight_decay=0.01, update_clip=0.0, support_clip_tau=0.0,
               support_clip_eps=1e-12, mode="std", max_grad_norm=None):
    if not 0.0 <= lr:
      raise ValueError(f"invalid lr {lr}")
    if mode not in ("std", "cf", "inv", "full"):
      raise ValueError(f"invalid mode {mode}")
    self.lr = lr
    self.betas = betas
    self.eps = eps
    self.weight_decay = weight_decay
    self.update_clip = update_clip
    self.support_clip_tau = support_clip_tau
    self.support_clip_eps = support_clip_eps
    self.mode = mode
    self.max_grad_norm = max_grad_norm
    self.state = {}
    self.grads = {}

  def _state(self, name):
    return self.state.setdefault(name, {})

  def optimizer_step(self, params, names=None):
    """`BiasCorrectedAdamW.step` (adamw.py:56-170), on ``params`` in place."""
    beta1, beta2 = self.betas
    eps = self.eps
    lr = self.lr
    wd = self.weight_decay
    update_clip = self.update_clip
    support_clip_tau = self.support_clip_tau
    support_clip_eps = self.support_clip_eps

    for name in (params if names is None else names):
      state = self._state(name)
      g_for_m = state.pop("_g_for_m", None)
      v_step = state.pop("_v_step", None)
      g_sq_micro = state.pop("_g_sq_micro", None)
      var_bar_p_pre = state.pop("_var_bar_p", None)
      if g_for_m is None or v_step is None:
        continue

      if "step" not in state:
        state["step"] = 0
        state["exp_avg"] = np.zeros_like(params[name])
        state["exp_avg_sq"] = np.zeros_like(params[name])

      state["step"] += 1
      t = state["step"]
      m = state["exp_avg"]
      v = state["exp_avg_sq"]

      g_for_m_f = g_for_m
      v_step_f = v_step

      # 1) Decoupled weight decay.
      if wd != 0:
        params[name] = params[name] * (1.0 - lr * wd)

      # 2) Var(bar p_t) from v_{t-1}, before v is updated.
      bc2 = 1.0 - beta2 ** t
      var_bar_p = None
      if var_bar_p_pre is not None:
        var_bar_p = np.maximum(var_bar_p_pre, 0.0)
      elif g_sq_micro is not None and len(g_sq_micro) >= 2:
        mcount = len(g_sq_micro)
        p_mean = None
        p_M2 = None
        for j, g_sq in enumerate(g_sq_micro):
          v_j = beta2 * v + (1.0 - beta2) * g_sq
          v_hat_j = np.maximum(v_j / bc2, 0.0)
          p_j = np.sqrt(v_hat_j)
          if p_mean is None:
            p_mean = p_j.copy()
            p_M2 = np.zeros_like(p_j)
          else:
            cnt = j + 1
            delta = p_j - p_mean
            p_mean = p_mean + delta / cnt
            delta2 = p_j - p_mean
            p_M2 = p_M2 + delta * delta2
        var_bar_p = np.maximum(p_M2 / (mcount * (mcount - 1)), 0.0)

      # 3) m and v EMAs.
      m = beta1 * m + (1.0 - beta1) * g_for_m_f
      v = beta2 * v + (1.0 - beta2) * v_step_f
      state["exp_avg"], state["exp_avg_sq"] = m, v

      # 4) Bias correction.
      bc1 = 1.0 - beta1 ** t
      m_hat = m / bc1
      v_hat = v / bc2

      # 5) (Corrected) inverse denominator.
      p_t = np.sqrt(v_hat)
      denom = p_t + eps
      inv = 1.0 / denom
      if var_bar_p is not None:
        correction = var_bar_p / denom ** 3
        inv = np.maximum(inv - correction, 0.0)

      # 6) u_t = m_hat * inv, then the optional clips.
      update = m_hat * inv
      if support_clip_tau > 0:
        s_A = g_for_m_f ** 2
        s_B = v_step_f
        factor = np.sqrt(support_clip_tau * (s_B + support_clip_eps)
                         / (s_A + support_clip_eps))
        factor = np.minimum(factor, 1.0)
        update = update * factor
      if update_clip > 0:
        update = np.clip(update, -update_clip, update_clip)
      if not np.all(np.isfinite(update)):
        continue
      params[name] = params[name] + (-lr) * update

  def collect_and_populate_streaming(self, microbatch_grads, num_micro, mode):
    """The streaming collector `adamw_pretrain.py` runs: std / cf are
    `trainers/adamw_sft.py:collect_and_populate_streaming` (208-292), full is
    `collectors/full_post_ema.py:collect_and_populate_streaming` (38-188),
    inv is `collectors/full_post_ema.py:_collect_inv_streaming` (193-288)."""
    n_mb = next(iter(microbatch_grads.values())).shape[0]
    if mode in ("std", "cf"):
      assert n_mb == 2 * num_micro
      cross_fit = mode == "cf"
      A_idx = set(range(num_micro)) if cross_fit else set(range(n_mb))
      B_idx = set(range(num_micro, n_mb)) if cross_fit else set()
      n_A = len(A_idx)
      n_B = len(B_idx)
      g_A = {}
      s_B = {} if cross_fit else None
      for k in range(n_mb):
        for name, gs in microbatch_grads.items():
          g = gs[k]
          if k in A_idx:
            if name not in g_A:
              g_A[name] = g / n_A
            else:
              g_A[name] = g_A[name] + g * (1.0 / n_A)
          if cross_fit and k in B_idx:
            g_sq = g ** 2
            if name not in s_B:
              s_B[name] = g_sq / n_B
            else:
              s_B[name] = s_B[name] + g_sq * (1.0 / n_B)
      for name in microbatch_grads:
        g_for_m = g_A[name]
        if cross_fit:
          v_step = s_B[name]   # crossfit_alpha = 1.0, the scripts' setting
        else:
          v_step = g_for_m ** 2
        st = self._state(name)
        st["_g_for_m"] = g_for_m
        st["_v_step"] = v_step
        st["_g_sq_micro"] = None
        self.grads[name] = g_for_m
      return

    if mode == "inv":
      self._collect_inv_streaming(microbatch_grads)
      return

    # mode == "full"
    assert n_mb == 2 * num_micro
    n_A = num_micro
    n_B = num_micro
    beta2 = float(self.betas[1])
    g_A_mean, bar_s, p_mean, p_M2, b_count = {}, {}, {}, {}, {}
    v_prev_cache, bc2_cache = {}, {}
    for k in range(n_mb):
      in_A = k < num_micro
      for name, gs in microbatch_grads.items():
        g = gs[k]
        if in_A:
          if name not in g_A_mean:
            g_A_mean[name] = g / n_A
          else:
            g_A_mean[name] = g_A_mean[name] + g * (1.0 / n_A)
        else:
          s_j = g ** 2
          if name not in bar_s:
            bar_s[name] = s_j / n_B
          else:
            bar_s[name] = bar_s[name] + s_j * (1.0 / n_B)
          if name not in v_prev_cache:
            st = self._state(name)
            v_prev = st.get("exp_avg_sq", None)
            if v_prev is None:
              v_prev = np.zeros_like(g)
              step_t = 1
            else:
              step_t = int(st.get("step", 0)) + 1
            v_prev_cache[name] = v_prev
            bc2_cache[name] = 1.0 - beta2 ** step_t
          v_prev = v_prev_cache[name]
          bc2 = bc2_cache[name]
          v_j = beta2 * v_prev + (1.0 - beta2) * s_j
          v_hat_j = np.maximum(v_j / bc2, 0.0)
          p_j = np.sqrt(v_hat_j)
          if name not in p_mean:
            p_mean[name] = p_j.copy()
            p_M2[name] = np.zeros_like(p_j)
            b_count[name] = 1
          else:
            b_count[name] += 1
            cnt = b_count[name]
            delta = p_j - p_mean[name]
            p_mean[name] = p_mean[name] + delta * (1.0 / cnt)
            delta2 = p_j - p_mean[name]
            p_M2[name] = p_M2[name] + delta * delta2
    for name in microbatch_grads:
      g_for_m = g_A_mean[name]
      v_step = bar_s.get(name, None)
      var_bar_p = None
      if v_step is not None and b_count.get(name, 0) >= 2:
        m_eff = b_count[name]
        var_bar_p = np.maximum(p_M2[name] / (m_eff * (m_eff - 1)), 0.0)
      elif v_step is None:
        v_step = g_for_m ** 2
      st = self._state(name)
      st["_g_for_m"] = g_for_m
      st["_v_step"] = v_step
      st["_g_sq_micro"] = None
      st["_var_bar_p"] = var_bar_p
      self.grads[name] = g_for_m

  def _collect_inv_streaming(self, microbatch_grads):
    """`collectors/full_post_ema.py:_collect_inv_streaming` (193-288)."""
    n_mb = next(iter(microbatch_grads.values())).shape[0]
    beta2 = float(self.betas[1])
    g_full_mean, p_mean, p_M2, b_count = {}, {}, {}, {}
    v_prev_cache, bc2_cache = {}, {}
    for k in range(n_mb):
      for name, gs in microbatch_grads.items():
        g = gs[k]
        if name not in g_full_mean:
          g_full_mean[name] = g / n_mb
        else:
          g_full_mean[name] = g_full_mean[name] + g * (1.0 / n_mb)
        s_j = g ** 2
        if name not in v_prev_cache:
          st = self._state(name)
          v_prev = st.get("exp_avg_sq", None)
          if v_prev is None:
            v_prev = np.zeros_like(g)
            step_t = 1
          else:
            step_t = int(st.get("step", 0)) + 1
          v_prev_cache[name] = v_prev
          bc2_cache[name] = 1.0 - beta2 ** step_t
        v_prev = v_prev_cache[name]
        bc2 = bc2_cache[name]
        v_j = beta2 * v_prev + (1.0 - beta2) * s_j
        v_hat_j = np.maximum(v_j / bc2, 0.0)
        p_j = np.sqrt(v_hat_j)
        if name not in p_mean:
          p_mean[name] = p_j.copy()
          p_M2[name] = np.zeros_like(p_j)
          b_count[name] = 1
        else:
          b_count[name] += 1
          cnt = b_count[name]
          delta = p_j - p_mean[name]
          p_mean[name] = p_mean[name] + delta * (1.0 / cnt)
          delta2 = p_j - p_mean[name]
          p_M2[name] = p_M2[name] + delta * delta2
    for name in microbatch_grads:
      g_for_m = g_full_mean[name]
      v_step = g_for_m ** 2
      var_bar_p = None
      if b_count.get(name, 0) >= 2:
        m_eff = b_count[name]
        var_bar_p = np.maximum(p_M2[name] / (m_eff * (m_eff - 1)), 0.0)
      st = self._state(name)
      st["_g_for_m"] = g_for_m
      st["_v_step"] = v_step
      st["_g_sq_micro"] = None
      st["_var_bar_p"] = var_bar_p
      self.grads[name] = g_for_m

  def step(self, params, microbatch_grads):
    """One step of `trainers/adamw_pretrain.py:train` (247-266): collect,
    clip ``p.grad`` (aliased to ``_g_for_m``), ``optimizer.step()``."""
    params = _as_float64(params)
    microbatch_grads = _as_float64(microbatch_grads)
    n_mb = next(iter(microbatch_grads.values())).shape[0]
    if self.mode in ("cf", "full") and n_mb % 2:
      raise ValueError("cf/full need an even number of microbatches (A | B)")
    self.grads = {}
    self.collect_and_populate_streaming(microbatch_grads, n_mb // 2, self.mode)
    if self.max_grad_norm is not None:
      clip_grad_norm_(list(self.grads.values()), self.max_grad_norm)
    self.optimizer_step(params)
    return params


# --------------------------------------------------------------------------
# AdamW: the leave-one-out form (the paper's headline pretraining run)
# --------------------------------------------------------------------------


class LOOBCAdamW:
  """`LOOBCAdamW` (optimizers/adamw_loo.py:59-109) for the dense parameters
  and a std `BiasCorrectedAdamW` for the sparse ones, fed by
  `collectors/loo_hybrid.py:collect_loo_hybrid` (83-254), in the step order
  of `trainers/adamw_pretrain_loo.py:train` (239-253).

  Parameters whose name contains "embed_tokens" or "lm_head" are sparse
  (adamw_pretrain_loo.py:85-89, 120-132) unless ``all_dense``. The sparse
  optimizer gets ``lr_sparse`` (``--lr_embed``; default: ``lr``), the same
  betas, eps and weight decay, and ``update_clip=0.0``
  (adamw_pretrain_loo.py:158-163). ``jensen_correction`` is the collector's
  argument (default False there; the headline script passes True).
  """

  def __init__(self, lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
               weight_decay=0.01, update_clip=0.0, jensen_correction=False,
               lr_sparse=None, all_dense=False, max_grad_norm=None):
    if not 0.0 <= lr:
      raise ValueError(f"invalid lr {lr}")
    self.lr = lr
    self.betas = betas
    self.eps = eps
    self.weight_decay = weight_decay
    self.update_clip = update_clip
    self.jensen_correction = jensen_correction
    self.all_dense = all_dense
    self.max_grad_norm = max_grad_norm
    self.state = {}
    self.grads = {}
    self.std_optimizer = BiasCorrectedAdamW(
        lr=lr if lr_sparse is None else lr_sparse, betas=betas, eps=eps,
        weight_decay=weight_decay, update_clip=0.0)

  @property
  def lr_sparse(self):
    return self.std_optimizer.lr

  @lr_sparse.setter
  def lr_sparse(self, value):
    self.std_optimizer.lr = value

  def is_sparse(self, name):
    """`_is_sparse_support` (adamw_pretrain_loo.py:88-89), ``--all_dense``."""
    if self.all_dense:
      return False
    return any(pat in name for pat in _SPARSE_NAME_PATTERNS)

  def _state(self, name):
    return self.state.setdefault(name, {})

  def collect_loo_hybrid(self, microbatch_grads, sparse_set, dense_set,
                         jensen_correction=False):
    """`collect_loo_hybrid` (collectors/loo_hybrid.py:83-254)."""
    m_count = next(iter(microbatch_grads.values())).shape[0]
    if m_count < 2:
      raise ValueError(
          f"LOO collector needs >= 2 microbatches, got {m_count}")
    all_params = list(sparse_set) + list(dense_set)
    beta1, beta2 = self.betas
    eps = self.eps
    beta1 = float(beta1)
    beta2 = float(beta2)
    eps = float(eps)

    # PASS 1: g_full = (1/m) sum_r g_r, every parameter.
    g_full = {}
    for k in range(m_count):
      for name in all_params:
        g = microbatch_grads[name][k]
        if name not in g_full:
          g_full[name] = g / m_count
        else:
          g_full[name] = g_full[name] + g * (1.0 / m_count)

    # PASS 2: per-fold LOO update, dense parameters.
    m_prev, v_prev, bc1, bc2 = {}, {}, {}, {}
    u_first, u_third, p_mean, p_M2, p_count = {}, {}, {}, {}, {}
    for name in dense_set:
      st = self._state(name)
      mp = st.get("exp_avg", None)
      vp = st.get("exp_avg_sq", None)
      step_t = int(st.get("step", 0)) + 1
      if mp is None:
        mp = np.zeros_like(g_full[name])
      if vp is None:
        vp = np.zeros_like(g_full[name])
      m_prev[name] = mp
      v_prev[name] = vp
      bc1[name] = 1.0 - beta1 ** step_t
      bc2[name] = 1.0 - beta2 ** step_t
      u_first[name] = np.zeros_like(g_full[name])
      if jensen_correction:
        u_third[name] = np.zeros_like(g_full[name])

    for k in range(m_count):
      for name in dense_set:
        g_r = microbatch_grads[name][k]
        g_neg_r = m_count * g_full[name]
        g_neg_r = g_neg_r - g_r
        g_neg_r = g_neg_r / (m_count - 1)
        s_neg_r = g_neg_r * g_neg_r
        v_neg_r_hat = beta2 * v_prev[name] + (1.0 - beta2) * s_neg_r
        v_neg_r_hat = np.maximum(v_neg_r_hat / bc2[name], 0.0)
        denom_r = np.sqrt(v_neg_r_hat) + eps
        m_r_hat = beta1 * m_prev[name] + (1.0 - beta1) * g_r
        m_r_hat = m_r_hat / bc1[name]
        inv_r = m_r_hat / denom_r
        u_first[name] = u_first[name] + inv_r * (1.0 / m_count)
        if jensen_correction:
          denom_r_cube = denom_r ** 3
          third_r = m_r_hat / denom_r_cube
          u_third[name] = u_third[name] + third_r * (1.0 / m_count)
          if name not in p_mean:
            p_mean[name] = denom_r.copy()
            p_M2[name] = np.zeros_like(denom_r)
            p_count[name] = 1
          else:
            p_count[name] += 1
            cnt = p_count[name]
            delta = denom_r - p_mean[name]
            p_mean[name] = p_mean[name] + delta * (1.0 / cnt)
            delta2 = denom_r - p_mean[name]
            p_M2[name] = p_M2[name] + delta * delta2

    # Post-pass-2: the Jensen correction, sign-flips zeroed.
    u_total = {}
    for name in dense_set:
      if (not jensen_correction or name not in p_M2
          or p_count.get(name, 0) < 2):
        u_total[name] = u_first[name]
        continue
      cnt = p_count[name]
      var_p = np.maximum(p_M2[name] / max(cnt - 1, 1), 0.0)
      correction = var_p * u_third[name]
      u_corrected = u_first[name] - correction
      same_sign = (u_corrected * u_first[name]) >= 0
      u_total[name] = np.where(same_sign, u_corrected,
                               np.zeros_like(u_corrected))

    # Sparse parameters: std AdamW buffers.
    for name in sparse_set:
      gf = g_full[name]
      st = self.std_optimizer._state(name)
      st["_g_for_m"] = gf
      st["_v_step"] = gf ** 2
      st["_g_sq_micro"] = None
      st["_var_bar_p"] = None
      self.grads[name] = gf

    # Dense parameters: LOO buffers.
    for name in dense_set:
      st = self._state(name)
      st["_g_full"] = g_full[name]
      st["_u_total"] = u_total[name]
      self.grads[name] = g_full[name]

  def optimizer_step(self, params, names):
    """`LOOBCAdamW.step` (adamw_loo.py:68-109), on ``params`` in place."""
    beta1, beta2 = self.betas
    lr = self.lr
    wd = self.weight_decay
    update_clip = self.update_clip
    for name in names:
      state = self._state(name)
      g_full = state.pop("_g_full", None)
      u_total = state.pop("_u_total", None)
      if g_full is None or u_total is None:
        continue
      if "step" not in state:
        state["step"] = 0
        state["exp_avg"] = np.zeros_like(params[name])
        state["exp_avg_sq"] = np.zeros_like(params[name])
      state["step"] += 1
      g_full_f = g_full
      u_total_f = u_total
      if wd != 0:
        params[name] = params[name] * (1.0 - lr * wd)
      if update_clip > 0:
        u_total_f = np.clip(u_total_f, -update_clip, update_clip)
      if not np.all(np.isfinite(u_total_f)):
        continue
      params[name] = params[name] + (-lr) * u_total_f
      state["exp_avg"] = beta1 * state["exp_avg"] + (1.0 - beta1) * g_full_f
      state["exp_avg_sq"] = (beta2 * state["exp_avg_sq"]
                             + (1.0 - beta2) * g_full_f * g_full_f)

  def step(self, params, microbatch_grads):
    """One step of `trainers/adamw_pretrain_loo.py:train` (239-253):
    collect, clip all ``p.grad`` (aliased to ``_g_full`` / ``_g_for_m``),
    the std optimizer's step, then the LOO optimizer's step."""
    params = _as_float64(params)
    microbatch_grads = _as_float64(microbatch_grads)
    names = list(params)
    sparse_set = [n for n in names if self.is_sparse(n)]
    dense_set = [n for n in names if not self.is_sparse(n)]
    self.grads = {}
    self.collect_loo_hybrid(microbatch_grads, sparse_set, dense_set,
                            jensen_correction=self.jensen_correction)
    if self.max_grad_norm is not None:
      clip_grad_norm_([self.grads[n] for n in sparse_set + dense_set],
                      self.max_grad_norm)
    if sparse_set:
      self.std_optimizer.optimizer_step(params, sparse_set)
    self.optimizer_step(params, dense_set)
    return params


# --------------------------------------------------------------------------
# Shampoo
# --------------------------------------------------------------------------


def is_shampoo_eligible(shape, max_dim):
  """`is_shampoo_eligible` (optimizers/shampoo.py:59-62)."""
  return len(shape) == 2 and 1 < min(shape) and max(shape) <= max_dim


class BiasCorrectedShampoo:
  """`BiasCorrectedShampoo` (optimizers/shampoo.py:65-316) with the one-pass
  trainer helpers `collect_per_step` / `populate_buffers`
  (trainers/shampoo_sft.py:107-210) and the step of
  `trainers/shampoo_pretrain.py:train` (195-236).

  ``mode``: std (A = B = all microbatches), cf (momentum from group A = the
  first half, L and R from group B = the second half), inv (std plus the
  variance correction over all microbatches), full (cf plus the variance
  correction over group B). The inverse roots, and with them L and R, are
  refreshed on trainer steps 0, f, 2f, ... (f = ``shampoo_root_freq``);
  ``trainer_step`` counts the calls of `step` from 0.
  """

  def __init__(self, lr=1e-3, weight_decay=0.01, adamw_betas=(0.9, 0.999),
               adamw_eps=1e-8, adamw_update_clip=0.0, shampoo_beta1=0.9,
               shampoo_beta2=0.95, shampoo_damping=1e-6, shampoo_max_dim=2048,
               shampoo_root_freq=10, shampoo_d_max=0.0, update_clip_fro=0.0,
               mode="std", max_grad_norm=None):
    if mode not in ("std", "cf", "inv", "full"):
      raise ValueError(f"invalid mode {mode}")
    self.lr = lr
    self.weight_decay = weight_decay
    self.adamw_betas = adamw_betas
    self.adamw_eps = adamw_eps
    self.adamw_update_clip = adamw_update_clip
    self.shampoo_beta1 = shampoo_beta1
    self.shampoo_beta2 = shampoo_beta2
    self.shampoo_damping = shampoo_damping
    self.shampoo_max_dim = shampoo_max_dim
    self.shampoo_root_freq = shampoo_root_freq
    self.shampoo_d_max = shampoo_d_max
    self.update_clip_fro = update_clip_fro
    self.mode = mode
    self.max_grad_norm = max_grad_norm
    self.state = {}
    self.grads = {}
    self.trainer_step = 0

  def _state(self, name):
    return self.state.setdefault(name, {})

  def optimizer_step(self, params):
    """`BiasCorrectedShampoo.step` (shampoo.py:93-103)."""
    for name in params:
      state = self._state(name)
      if is_shampoo_eligible(params[name].shape, self.shampoo_max_dim):
        self._step_shampoo(params, name, state)
      else:
        self._step_adamw(params, name, state)

  def _step_shampoo(self, params, name, state):
    """`BiasCorrectedShampoo._step_shampoo` (shampoo.py:106-223)."""
    g_A = state.pop("_g_A", None)
    S_L_step = state.pop("_S_L_step", None)
    S_R_step = state.pop("_S_R_step", None)
    S_L_micro = state.pop("_S_L_micro", None)
    S_R_micro = state.pop("_S_R_micro", None)
    if g_A is None:
      return
    if "step" not in state:
      d1, d2 = params[name].shape
      state["step"] = 0
      state["M"] = np.zeros_like(params[name])
      state["L"] = np.zeros((d1, d1))
      state["R"] = np.zeros((d2, d2))
      state["P_L_corr"] = None
      state["P_R_corr"] = None

    state["step"] += 1
    beta1 = self.shampoo_beta1
    beta2 = self.shampoo_beta2
    damping = self.shampoo_damping
    d_max = self.shampoo_d_max
    lr = self.lr
    wd = self.weight_decay
    clip_fro = self.update_clip_fro
    d1, d2 = params[name].shape

    if wd != 0:
      params[name] = params[name] * (1.0 - lr * wd)

    state["M"] = beta1 * state["M"] + (1.0 - beta1) * g_A
    M = state["M"]

    if S_L_step is not None and S_R_step is not None:
      do_var = (S_L_micro is not None and S_R_micro is not None
                and len(S_L_micro) >= 2 and len(S_R_micro) >= 2)
      L_prev = state["L"].copy() if do_var else None
      R_prev = state["R"].copy() if do_var else None

      state["L"] = beta2 * state["L"] + (1.0 - beta2) * S_L_step
      state["R"] = beta2 * state["R"] + (1.0 - beta2) * S_R_step

      I_L = np.eye(d1)
      I_R = np.eye(d2)
      Lbar = state["L"] + damping * I_L
      Rbar = state["R"] + damping * I_R
      eigvals_L, Q_L = np.linalg.eigh(Lbar)
      eigvals_R, Q_R = np.linalg.eigh(Rbar)
      eigvals_L = np.maximum(eigvals_L, damping * 1e-3)
      eigvals_R = np.maximum(eigvals_R, damping * 1e-3)

      if do_var:
        var_L = self._variance_along_eigenbasis(
            L_prev, S_L_micro, beta2, damping, Q_L, I_L)
        var_R = self._variance_along_eigenbasis(
            R_prev, S_R_micro, beta2, damping, Q_R, I_R)
      else:
        var_L = np.zeros_like(eigvals_L)
        var_R = np.zeros_like(eigvals_R)

      # f(x) = x^{-1/4}: d = f(lambda) - (5/32) lambda^{-9/4} Var.
      d_L = eigvals_L ** -0.25 - (5.0 / 32.0) * eigvals_L ** -2.25 * var_L
      d_R = eigvals_R ** -0.25 - (5.0 / 32.0) * eigvals_R ** -2.25 * var_R
      d_L = np.maximum(d_L, 0.0)
      d_R = np.maximum(d_R, 0.0)
      if d_max > 0:
        d_L = np.minimum(d_L, d_max)
        d_R = np.minimum(d_R, d_max)

      P_L = (Q_L * d_L[None, :]) @ Q_L.T
      P_R = (Q_R * d_R[None, :]) @ Q_R.T
      state["P_L_corr"] = P_L
      state["P_R_corr"] = P_R
    else:
      P_L = state.get("P_L_corr")
      P_R = state.get("P_R_corr")

    if P_L is None or P_R is None:
      U = M
    else:
      U = P_L @ M @ P_R
    if clip_fro > 0:
      fro = np.linalg.norm(U)
      if fro > clip_fro:
        U = U * (clip_fro / fro)
    if not np.all(np.isfinite(U)):
      return
    params[name] = params[name] + (-lr) * U

  @staticmethod
  def _variance_along_eigenbasis(M_prev, S_micro, beta2, damping, Q, I):
    """`_variance_along_eigenbasis` (shampoo.py:225-242): the ddof-1 sample
    variance over microbatches of diag(Qᵀ (β2 M_prev + (1-β2) S_j + λI) Q),
    divided by m."""
    m = len(S_micro)
    ells = np.empty((m, Q.shape[1]))
    for j, S_j in enumerate(S_micro):
      M_tj = beta2 * M_prev + (1.0 - beta2) * S_j
      Mbar_tj = M_tj + damping * I
      tmp = Mbar_tj @ Q
      ells[j] = (Q * tmp).sum(axis=0)
    ell_mean = ells.mean(axis=0)
    ell_M2 = ((ells - ell_mean[None, :]) ** 2).sum(axis=0)
    var = ell_M2 / (m * (m - 1))
    return np.maximum(var, 0.0)

  def _step_adamw(self, params, name, state):
    """`BiasCorrectedShampoo._step_adamw` (shampoo.py:245-316): the AdamW
    used for every parameter Shampoo does not take (1-D, embeddings)."""
    g_for_m = state.pop("_g_for_m", None)
    v_step = state.pop("_v_step", None)
    g_sq_micro = state.pop("_g_sq_micro", None)
    if g_for_m is None or v_step is None:
      return
    if "step" not in state:
      state["step"] = 0
      state["exp_avg"] = np.zeros_like(params[name])
      state["exp_avg_sq"] = np.zeros_like(params[name])
    state["step"] += 1
    t = state["step"]
    beta1, beta2 = self.adamw_betas
    eps = self.adamw_eps
    lr = self.lr
    wd = self.weight_decay
    update_clip = self.adamw_update_clip

    if wd != 0:
      params[name] = params[name] * (1.0 - lr * wd)

    v = state["exp_avg_sq"]
    bc2 = 1.0 - beta2 ** t
    var_bar_p = None
    if g_sq_micro is not None and len(g_sq_micro) >= 2:
      mcount = len(g_sq_micro)
      p_mean = None
      p_M2 = None
      for j, g_sq in enumerate(g_sq_micro):
        v_j = beta2 * v + (1.0 - beta2) * g_sq
        p_j = np.sqrt(np.maximum(v_j / bc2, 0.0))
        if p_mean is None:
          p_mean = p_j.copy()
          p_M2 = np.zeros_like(p_j)
        else:
          cnt = j + 1
          delta = p_j - p_mean
          p_mean = p_mean + delta / cnt
          delta2 = p_j - p_mean
          p_M2 = p_M2 + delta * delta2
      var_bar_p = np.maximum(p_M2 / (mcount * (mcount - 1)), 0.0)

    state["exp_avg"] = beta1 * state["exp_avg"] + (1.0 - beta1) * g_for_m
    state["exp_avg_sq"] = beta2 * v + (1.0 - beta2) * v_step
    bc1 = 1.0 - beta1 ** t
    m_hat = state["exp_avg"] / bc1
    v_hat = state["exp_avg_sq"] / bc2
    denom = np.sqrt(v_hat) + eps
    inv = 1.0 / denom
    if var_bar_p is not None:
      inv = np.maximum(inv - var_bar_p / denom ** 3, 0.0)
    update = m_hat * inv
    if update_clip > 0:
      update = np.clip(update, -update_clip, update_clip)
    if not np.all(np.isfinite(update)):
      return
    params[name] = params[name] + (-lr) * update

  # ---- trainer side ----

  def collect_per_step(self, microbatch_grads, shampoo_names, A_idx, B_idx,
                       want_b_micro):
    """`collect_per_step` (trainers/shampoo_sft.py:107-148): grad_full over
    all microbatches, grad_A over A, the list of B gradients on refresh
    steps."""
    n_total = next(iter(microbatch_grads.values())).shape[0]
    n_A = len(A_idx)
    A_set = set(A_idx)
    B_set = set(B_idx)
    grad_full, grad_A = {}, {}
    G_micro_B = {} if want_b_micro else None
    for k in range(n_total):
      for name, gs in microbatch_grads.items():
        g = gs[k]
        if name not in grad_full:
          grad_full[name] = g / n_total
        else:
          grad_full[name] = grad_full[name] + g * (1.0 / n_total)
        if k in A_set:
          if name not in grad_A:
            grad_A[name] = g / n_A
          else:
            grad_A[name] = grad_A[name] + g * (1.0 / n_A)
        if want_b_micro and name in shampoo_names and k in B_set:
          G_micro_B.setdefault(name, []).append(g.copy())
    return grad_full, grad_A, G_micro_B

  def populate_buffers(self, microbatch_grads, shampoo_names, collected,
                       mode, do_hessian, B_idx):
    """`populate_buffers` (trainers/shampoo_sft.py:151-210)."""
    grad_full, grad_A, G_micro_B = collected
    cross_fit = mode in ("cf", "full")
    need_var = mode in ("inv", "full")
    for name in microbatch_grads:
      st = self._state(name)
      if name in shampoo_names:
        g_A_p = grad_A[name] if cross_fit else grad_full[name]
        st["_g_A"] = g_A_p
        self.grads[name] = g_A_p
        if do_hessian:
          if cross_fit:
            Gs = G_micro_B.get(name, [])
            if not Gs:
              st["_S_L_step"] = st["_S_R_step"] = None
              st["_S_L_micro"] = st["_S_R_micro"] = None
              continue
            S_L_list = [G @ G.T for G in Gs]
            S_R_list = [G.T @ G for G in Gs]
            st["_S_L_step"] = np.stack(S_L_list, 0).mean(0)
            st["_S_R_step"] = np.stack(S_R_list, 0).mean(0)
            st["_S_L_micro"] = S_L_list if need_var else None
            st["_S_R_micro"] = S_R_list if need_var else None
          else:
            Gf = grad_full[name]
            st["_S_L_step"] = Gf @ Gf.T
            st["_S_R_step"] = Gf.T @ Gf
            if need_var:
              Gs = G_micro_B.get(name, [])
              st["_S_L_micro"] = [G @ G.T for G in Gs] if Gs else None
              st["_S_R_micro"] = [G.T @ G for G in Gs] if Gs else None
            else:
              st["_S_L_micro"] = st["_S_R_micro"] = None
        else:
          st["_S_L_step"] = st["_S_R_step"] = None
          st["_S_L_micro"] = st["_S_R_micro"] = None
      else:
        gf = grad_A[name] if cross_fit else grad_full[name]
        st["_g_for_m"] = gf
        st["_v_step"] = gf ** 2
        st["_g_sq_micro"] = None
        self.grads[name] = gf

  def step(self, params, microbatch_grads):
    """One step of `trainers/shampoo_pretrain.py:train` (195-236): split
    A / B, refresh on trainer steps divisible by ``shampoo_root_freq``,
    collect, populate, clip ``p.grad`` (aliased to ``_g_A`` /
    ``_g_for_m``), ``optimizer.step()``."""
    params = _as_float64(params)
    microbatch_grads = _as_float64(microbatch_grads)
    self._params = params
    n_mb = next(iter(microbatch_grads.values())).shape[0]
    cross_fit = self.mode in ("cf", "full")
    if cross_fit and n_mb % 2:
      raise ValueError("cf/full need an even number of microbatches (A | B)")
    num_micro = n_mb // 2
    A_idx = list(range(num_micro)) if cross_fit else list(range(n_mb))
    B_idx = list(range(num_micro, n_mb)) if cross_fit else list(range(n_mb))
    shampoo_names = {n for n in params
                     if is_shampoo_eligible(params[n].shape,
                                            self.shampoo_max_dim)}
    do_hessian = self.trainer_step % self.shampoo_root_freq == 0
    self.grads = {}
    collected = self.collect_per_step(microbatch_grads, shampoo_names, A_idx,
                                      B_idx, want_b_micro=do_hessian)
    self.populate_buffers(microbatch_grads, shampoo_names, collected,
                          self.mode, do_hessian, B_idx)
    if self.max_grad_norm is not None:
      clip_grad_norm_(list(self.grads.values()), self.max_grad_norm)
    self.optimizer_step(params)
    self.trainer_step += 1
    return params


class BiasCorrectedShampooStreaming(BiasCorrectedShampoo):
  """`BiasCorrectedShampooStreaming` (optimizers/shampoo_streaming.py:45-247)
  with `populate_buffers_streaming` (250-314): the B gradients themselves,
  not their outer products, reach the optimizer; the variance is a Welford
  pass over them. Same mathematics as `BiasCorrectedShampoo`, except that
  `populate_buffers_streaming` hands the B gradients over in mode cf as in
  full (shampoo_streaming.py:282-291 ignore ``need_var``), and the step
  corrects whenever it has two of them: here cf runs as full."""

  def _step_shampoo(self, params, name, state):
    """`BiasCorrectedShampooStreaming._step_shampoo`
    (shampoo_streaming.py:47-189)."""
    g_A = state.pop("_g_A", None)
    G_micro = state.pop("_G_micro", None)
    S_L_step = state.pop("_S_L_step", None)
    S_R_step = state.pop("_S_R_step", None)
    do_hessian = state.pop("_do_hessian", False)
    if g_A is None:
      return
    if "step" not in state:
      d1, d2 = params[name].shape
      state["step"] = 0
      state["M"] = np.zeros_like(params[name])
      state["L"] = np.zeros((d1, d1))
      state["R"] = np.zeros((d2, d2))
      state["P_L_corr"] = None
      state["P_R_corr"] = None

    state["step"] += 1
    beta1 = self.shampoo_beta1
    beta2 = self.shampoo_beta2
    damping = self.shampoo_damping
    d_max = self.shampoo_d_max
    lr = self.lr
    wd = self.weight_decay
    clip_fro = self.update_clip_fro
    d1, d2 = params[name].shape

    if wd != 0:
      params[name] = params[name] * (1.0 - lr * wd)
    state["M"] = beta1 * state["M"] + (1.0 - beta1) * g_A
    M = state["M"]

    if do_hessian:
      if S_L_step is not None and S_R_step is not None:
        S_L_step_f = S_L_step
        S_R_step_f = S_R_step
      elif G_micro is not None and len(G_micro) >= 1:
        m = len(G_micro)
        S_L_step_f = None
        S_R_step_f = None
        for G in G_micro:
          sL = G @ G.T
          sR = G.T @ G
          if S_L_step_f is None:
            S_L_step_f = sL / m
            S_R_step_f = sR / m
          else:
            S_L_step_f = S_L_step_f + sL * (1.0 / m)
            S_R_step_f = S_R_step_f + sR * (1.0 / m)
      else:
        S_L_step_f = None
        S_R_step_f = None

      if S_L_step_f is not None:
        do_var = G_micro is not None and len(G_micro) >= 2
        L_prev = state["L"].copy() if do_var else None
        R_prev = state["R"].copy() if do_var else None
        state["L"] = beta2 * state["L"] + (1.0 - beta2) * S_L_step_f
        state["R"] = beta2 * state["R"] + (1.0 - beta2) * S_R_step_f
        Lbar = state["L"] + damping * np.eye(d1)
        Rbar = state["R"] + damping * np.eye(d2)
        eigvals_L, Q_L = np.linalg.eigh(Lbar)
        eigvals_R, Q_R = np.linalg.eigh(Rbar)
        eigvals_L = np.maximum(eigvals_L, damping * 1e-3)
        eigvals_R = np.maximum(eigvals_R, damping * 1e-3)
        if do_var:
          var_L = self._variance_along_eigenbasis_grads(
              L_prev, G_micro, beta2, damping, Q_L, side="L")
          var_R = self._variance_along_eigenbasis_grads(
              R_prev, G_micro, beta2, damping, Q_R, side="R")
        else:
          var_L = np.zeros_like(eigvals_L)
          var_R = np.zeros_like(eigvals_R)
        d_L = eigvals_L ** -0.25 - (5.0 / 32.0) * eigvals_L ** -2.25 * var_L
        d_R = eigvals_R ** -0.25 - (5.0 / 32.0) * eigvals_R ** -2.25 * var_R
        d_L = np.maximum(d_L, 0.0)
        d_R = np.maximum(d_R, 0.0)
        if d_max > 0:
          d_L = np.minimum(d_L, d_max)
          d_R = np.minimum(d_R, d_max)
        state["P_L_corr"] = (Q_L * d_L[None, :]) @ Q_L.T
        state["P_R_corr"] = (Q_R * d_R[None, :]) @ Q_R.T

    P_L = state.get("P_L_corr")
    P_R = state.get("P_R_corr")
    if P_L is None or P_R is None:
      U = M.copy()
    else:
      U = P_L @ M @ P_R
    if clip_fro > 0:
      fro = np.linalg.norm(U)
      if fro > clip_fro:
        U = U * (clip_fro / fro)
    if not np.all(np.isfinite(U)):
      return
    params[name] = params[name] + (-lr) * U

  @staticmethod
  def _variance_along_eigenbasis_grads(M_prev, G_micro, beta2, damping, Q,
                                       side):
    """`_variance_along_eigenbasis_grads` (shampoo_streaming.py:191-247):
    ell_jk = β2 (Qᵀ M_prev Q)_kk + (1-β2) ‖(Qᵀ G_j)_k,:‖² + λ (left; the
    right side takes the columns of G_j Q), Welford over j, M2 / (m (m-1))."""
    QtM = Q.T @ M_prev
    diag_prev = (QtM * Q.T).sum(axis=1)
    m = len(G_micro)
    ell_mean = None
    ell_M2 = None
    for j, G_j in enumerate(G_micro):
      if side == "L":
        H = Q.T @ G_j
        row_sq = (H * H).sum(axis=1)
      else:
        H = G_j @ Q
        row_sq = (H * H).sum(axis=0)
      ell_j = beta2 * diag_prev + (1.0 - beta2) * row_sq + damping
      if ell_mean is None:
        ell_mean = ell_j.copy()
        ell_M2 = np.zeros_like(ell_j)
      else:
        cnt = j + 1
        delta = ell_j - ell_mean
        ell_mean = ell_mean + delta / cnt
        delta2 = ell_j - ell_mean
        ell_M2 = ell_M2 + delta * delta2
    var = ell_M2 / (m * (m - 1)) if m >= 2 else np.zeros_like(ell_mean)
    return np.maximum(var, 0.0)

  def populate_buffers(self, microbatch_grads, shampoo_names, collected,
                       mode, do_hessian, B_idx):
    """`populate_buffers_streaming` (shampoo_streaming.py:250-314)."""
    grad_full, grad_A, G_micro_B = collected
    cross_fit = mode in ("cf", "full")
    need_var = mode in ("inv", "full")
    for name in microbatch_grads:
      st = self._state(name)
      if name in shampoo_names:
        g_A_p = grad_A[name] if cross_fit else grad_full[name]
        st["_g_A"] = g_A_p
        self.grads[name] = g_A_p
        if do_hessian:
          if cross_fit:
            Gs = G_micro_B.pop(name, []) if G_micro_B is not None else []
            st["_G_micro"] = Gs if Gs else None
            st["_S_L_step"] = None
            st["_S_R_step"] = None
          else:
            Gf = grad_full[name]
            st["_S_L_step"] = Gf @ Gf.T
            st["_S_R_step"] = Gf.T @ Gf
            if need_var:
              Gs = G_micro_B.pop(name, []) if G_micro_B is not None else []
              st["_G_micro"] = Gs if Gs else None
            else:
              st["_G_micro"] = None
          st["_do_hessian"] = True
        else:
          st["_S_L_step"] = None
          st["_S_R_step"] = None
          st["_G_micro"] = None
          st["_do_hessian"] = False
      else:
        gf = grad_A[name] if cross_fit else grad_full[name]
        st["_g_for_m"] = gf
        st["_v_step"] = gf ** 2
        st["_g_sq_micro"] = None
        self.grads[name] = gf


class BiasCorrectedShampooTwoPass(BiasCorrectedShampooStreaming):
  """`BiasCorrectedShampooTwoPass` (optimizers/shampoo_two_pass.py:60-255)
  with `pass1_collect_step` (258-331) and `finalize_and_populate_step`
  (334-409), as `trainers/shampoo_pretrain_two_pass.py` runs them: the
  optimizer and trainer of the paper's Shampoo pretraining.

  Pass 1 streams grad_full, grad_A and, on refresh steps in cf / full,
  S_L = mean_{j in B} G_j G_jᵀ and S_R. In mode full on refresh steps,
  `prepare_eigendecomp` updates L and R and eigendecomposes, and pass 2
  reads the B gradients again (here: the same arrays) into a Welford of
  the per-microbatch eigenvalue diagonals. Modes std and cf (and inv, which
  gets no variance correction on this path) fall through to the streaming
  step.
  """

  def prepare_eigendecomp(self, params):
    """`prepare_eigendecomp` (shampoo_two_pass.py:61-121)."""
    beta2 = self.shampoo_beta2
    damping = self.shampoo_damping
    max_dim = self.shampoo_max_dim
    for name in params:
      if not is_shampoo_eligible(params[name].shape, max_dim):
        continue
      state = self._state(name)
      S_L_step = state.pop("_S_L_step", None)
      S_R_step = state.pop("_S_R_step", None)
      if S_L_step is None or S_R_step is None:
        state["_two_pass_ready"] = False
        continue
      if "step" not in state:
        d1, d2 = params[name].shape
        state["step"] = 0
        state["M"] = np.zeros_like(params[name])
        state["L"] = np.zeros((d1, d1))
        state["R"] = np.zeros((d2, d2))
        state["P_L_corr"] = None
        state["P_R_corr"] = None
      d1, d2 = params[name].shape
      state["_L_prev"] = state["L"].copy()
      state["_R_prev"] = state["R"].copy()
      state["L"] = beta2 * state["L"] + (1.0 - beta2) * S_L_step
      state["R"] = beta2 * state["R"] + (1.0 - beta2) * S_R_step
      Lbar = state["L"] + damping * np.eye(d1)
      Rbar = state["R"] + damping * np.eye(d2)
      eigvals_L, Q_L = np.linalg.eigh(Lbar)
      eigvals_R, Q_R = np.linalg.eigh(Rbar)
      eigvals_L = np.maximum(eigvals_L, damping * 1e-3)
      eigvals_R = np.maximum(eigvals_R, damping * 1e-3)
      state["_Q_L"] = Q_L
      state["_Q_R"] = Q_R
      state["_eigvals_L"] = eigvals_L
      state["_eigvals_R"] = eigvals_R
      state["_ell_count"] = 0
      state["_ell_mean_L"] = None
      state["_ell_M2_L"] = None
      state["_ell_mean_R"] = None
      state["_ell_M2_R"] = None
      state["_diag_prev_L"] = None
      state["_diag_prev_R"] = None
      state["_pass2_beta2"] = beta2
      state["_pass2_damping"] = damping
      state["_two_pass_ready"] = True

  def accumulate_pass2_grad(self, name, G_j):
    """`accumulate_pass2_grad` (shampoo_two_pass.py:124-179)."""
    state = self._state(name)
    if not state.get("_two_pass_ready", False):
      return
    Q_L = state["_Q_L"]
    Q_R = state["_Q_R"]
    L_prev = state["_L_prev"]
    R_prev = state["_R_prev"]
    beta2 = state["_pass2_beta2"]
    damping = state["_pass2_damping"]
    Gf = G_j
    if state["_diag_prev_L"] is None:
      QtL = Q_L.T @ L_prev
      state["_diag_prev_L"] = (QtL * Q_L.T).sum(axis=1)
    if state["_diag_prev_R"] is None:
      QtR = Q_R.T @ R_prev
      state["_diag_prev_R"] = (QtR * Q_R.T).sum(axis=1)
    diag_prev_L = state["_diag_prev_L"]
    diag_prev_R = state["_diag_prev_R"]

    H_L = Q_L.T @ Gf
    row_sq_L = (H_L * H_L).sum(axis=1)
    ell_L_j = beta2 * diag_prev_L + (1.0 - beta2) * row_sq_L + damping
    H_R = Gf @ Q_R
    col_sq_R = (H_R * H_R).sum(axis=0)
    ell_R_j = beta2 * diag_prev_R + (1.0 - beta2) * col_sq_R + damping

    cnt_old = state["_ell_count"]
    cnt = cnt_old + 1
    state["_ell_count"] = cnt
    if cnt_old == 0:
      state["_ell_mean_L"] = ell_L_j.copy()
      state["_ell_M2_L"] = np.zeros_like(ell_L_j)
      state["_ell_mean_R"] = ell_R_j.copy()
      state["_ell_M2_R"] = np.zeros_like(ell_R_j)
    else:
      delta_L = ell_L_j - state["_ell_mean_L"]
      state["_ell_mean_L"] = state["_ell_mean_L"] + delta_L / cnt
      delta2_L = ell_L_j - state["_ell_mean_L"]
      state["_ell_M2_L"] = state["_ell_M2_L"] + delta_L * delta2_L
      delta_R = ell_R_j - state["_ell_mean_R"]
      state["_ell_mean_R"] = state["_ell_mean_R"] + delta_R / cnt
      delta2_R = ell_R_j - state["_ell_mean_R"]
      state["_ell_M2_R"] = state["_ell_M2_R"] + delta_R * delta2_R

  def _step_shampoo(self, params, name, state):
    """`BiasCorrectedShampooTwoPass._step_shampoo`
    (shampoo_two_pass.py:182-255)."""
    if not state.pop("_two_pass_ready", False):
      super()._step_shampoo(params, name, state)
      return
    g_A = state.pop("_g_A", None)
    if g_A is None:
      return
    Q_L = state.pop("_Q_L")
    Q_R = state.pop("_Q_R")
    eigvals_L = state.pop("_eigvals_L")
    eigvals_R = state.pop("_eigvals_R")
    state.pop("_L_prev")
    state.pop("_R_prev")
    state.pop("_ell_mean_L", None)
    ell_M2_L = state.pop("_ell_M2_L", None)
    state.pop("_ell_mean_R", None)
    ell_M2_R = state.pop("_ell_M2_R", None)
    ell_count = state.pop("_ell_count", 0)
    for key in ("_diag_prev_L", "_diag_prev_R", "_pass2_beta2",
                "_pass2_damping", "_S_L_step", "_S_R_step", "_G_micro",
                "_do_hessian"):
      state.pop(key, None)

    state["step"] += 1
    beta1 = self.shampoo_beta1
    d_max = self.shampoo_d_max
    lr = self.lr
    wd = self.weight_decay
    clip_fro = self.update_clip_fro

    if wd != 0:
      params[name] = params[name] * (1.0 - lr * wd)
    state["M"] = beta1 * state["M"] + (1.0 - beta1) * g_A
    M = state["M"]

    if ell_count >= 2 and ell_M2_L is not None:
      var_L = np.maximum(ell_M2_L / (ell_count * (ell_count - 1)), 0.0)
      var_R = np.maximum(ell_M2_R / (ell_count * (ell_count - 1)), 0.0)
    else:
      var_L = np.zeros_like(eigvals_L)
      var_R = np.zeros_like(eigvals_R)

    d_L = eigvals_L ** -0.25 - (5.0 / 32.0) * eigvals_L ** -2.25 * var_L
    d_R = eigvals_R ** -0.25 - (5.0 / 32.0) * eigvals_R ** -2.25 * var_R
    d_L = np.maximum(d_L, 0.0)
    d_R = np.maximum(d_R, 0.0)
    if d_max > 0:
      d_L = np.minimum(d_L, d_max)
      d_R = np.minimum(d_R, d_max)
    P_L = (Q_L * d_L[None, :]) @ Q_L.T
    P_R = (Q_R * d_R[None, :]) @ Q_R.T
    state["P_L_corr"] = P_L
    state["P_R_corr"] = P_R

    U = P_L @ M @ P_R
    if clip_fro > 0:
      fro = np.linalg.norm(U)
      if fro > clip_fro:
        U = U * (clip_fro / fro)
    if not np.all(np.isfinite(U)):
      return
    params[name] = params[name] + (-lr) * U

  def collect_per_step(self, microbatch_grads, shampoo_names, A_idx, B_idx,
                       want_b_micro):
    """`pass1_collect_step` (shampoo_two_pass.py:258-331)."""
    A_set = set(A_idx)
    B_set = set(B_idx)
    cross_fit = A_set.isdisjoint(B_set)
    n_total = next(iter(microbatch_grads.values())).shape[0]
    n_A = len(A_idx)
    grad_full, grad_A, S_L_acc, S_R_acc, b_count = {}, {}, {}, {}, {}
    for k in range(n_total):
      for name, gs in microbatch_grads.items():
        g = gs[k]
        if name not in grad_full:
          grad_full[name] = g / n_total
        else:
          grad_full[name] = grad_full[name] + g * (1.0 / n_total)
        if k in A_set:
          if name not in grad_A:
            grad_A[name] = g / n_A
          else:
            grad_A[name] = grad_A[name] + g * (1.0 / n_A)
        if want_b_micro and cross_fit and name in shampoo_names and k in B_set:
          sL = g @ g.T
          sR = g.T @ g
          if name not in S_L_acc:
            S_L_acc[name] = sL
            S_R_acc[name] = sR
            b_count[name] = 1
          else:
            S_L_acc[name] = S_L_acc[name] + sL
            S_R_acc[name] = S_R_acc[name] + sR
            b_count[name] += 1
    return grad_full, grad_A, S_L_acc, S_R_acc, b_count

  def populate_buffers(self, microbatch_grads, shampoo_names, collected,
                       mode, do_hessian, B_idx):
    """`finalize_and_populate_step` (shampoo_two_pass.py:334-409), pass 2
    included."""
    grad_full, grad_A, S_L_acc, S_R_acc, b_count = collected
    cross_fit = mode in ("cf", "full")
    if do_hessian:
      for name in microbatch_grads:
        if name in shampoo_names:
          st = self._state(name)
          if cross_fit:
            cnt = b_count.pop(name, 0)
            sL = S_L_acc.pop(name, None)
            sR = S_R_acc.pop(name, None)
            if cnt >= 1 and sL is not None:
              st["_S_L_step"] = sL / cnt
              st["_S_R_step"] = sR / cnt
            else:
              st["_S_L_step"] = None
              st["_S_R_step"] = None
          else:
            Gf = grad_full[name]
            st["_S_L_step"] = Gf @ Gf.T
            st["_S_R_step"] = Gf.T @ Gf
    for name in microbatch_grads:
      st = self._state(name)
      if name in shampoo_names:
        g_A_p = grad_A[name] if cross_fit else grad_full[name]
        st["_g_A"] = g_A_p
        if not do_hessian:
          st["_S_L_step"] = None
          st["_S_R_step"] = None
        st["_G_micro"] = None
        st["_do_hessian"] = do_hessian
        self.grads[name] = g_A_p
      else:
        gf = grad_A[name] if cross_fit else grad_full[name]
        st["_g_for_m"] = gf
        st["_v_step"] = gf ** 2
        st["_g_sq_micro"] = None
        self.grads[name] = gf

    if do_hessian and mode == "full":
      self.prepare_eigendecomp(self._params)
      # Pass 2: backward over the B microbatches again.
      for k in B_idx:
        for name in microbatch_grads:
          if name in shampoo_names:
            self.accumulate_pass2_grad(name, microbatch_grads[name][k])
