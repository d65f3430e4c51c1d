"""The official SOAP optimizer, ported line by line to NumPy float64.

Source: https://github.com/nikhilvyas/SOAP, file ``soap.py`` at commit
a1e5535 ("Merge pull request #18 from nikhilvyas/mkwun"), the PyTorch
reference implementation of Vyas et al., "SOAP: Improving and Stabilizing
Shampoo using Adam" (ICLR 2025). Each method below mirrors the method of the
same name there, statement by statement; only the tensor library changes
(``torch.tensordot`` -> ``np.tensordot``, ``permute`` -> ``np.transpose``,
``lerp_(x, w)`` -> ``a + w * (x - a)``, ``index_select`` -> ``np.take``) and
the optimizer takes parameters and gradients as lists of arrays instead of
``torch.nn.Parameter``s with ``.grad``. The float32 fallbacks of the
original (casting non-float32 statistics) do not apply in float64.

Used only by the tests, as the ground truth that `foam_optax.soap` must
reproduce with its defaults.
"""

from __future__ import annotations

from itertools import chain

import numpy as np


class SOAP:
  """`SOAP(params, lr=3e-3, betas=(0.95, 0.95), ...)` as in the original."""

  def __init__(self, params, lr=3e-3, betas=(0.95, 0.95), shampoo_beta=-1,
               eps=1e-8, weight_decay=0.01, precondition_frequency=10,
               max_precond_dim=10000, merge_dims=False, precondition_1d=False,
               normalize_grads=False, data_format="channels_first",
               correct_bias=True):
    self.params = [np.array(p, np.float64) for p in params]
    self.group = dict(
        lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps,
        weight_decay=weight_decay,
        precondition_frequency=precondition_frequency,
        max_precond_dim=max_precond_dim, merge_dims=merge_dims,
        precondition_1d=precondition_1d, normalize_grads=normalize_grads,
        correct_bias=correct_bias)
    self._data_format = data_format
    self.state = [{} for _ in self.params]

  def merge_dims(self, grad, max_precond_dim):
    assert self._data_format in ["channels_first", "channels_last"]
    if self._data_format == "channels_last" and grad.ndim == 4:
      grad = np.transpose(grad, (0, 3, 1, 2))
    shape = grad.shape
    new_shape = []
    curr_shape = 1
    for sh in shape:
      temp_shape = curr_shape * sh
      if temp_shape > max_precond_dim:
        if curr_shape > 1:
          new_shape.append(curr_shape)
          curr_shape = sh
        else:
          new_shape.append(sh)
          curr_shape = 1
      else:
        curr_shape = temp_shape
    if curr_shape > 1 or len(new_shape) == 0:
      new_shape.append(curr_shape)
    return grad.reshape(new_shape)

  def step(self, grads):
    """One `optimizer.step()` with these gradients; returns the parameters."""
    group = self.group
    for index, grad in enumerate(grads):
      grad = np.asarray(grad, np.float64)
      p = self.params[index]
      state = self.state[index]
      if "step" not in state:
        state["step"] = 0
      if "exp_avg" not in state:
        state["exp_avg"] = np.zeros_like(grad)
        state["exp_avg_sq"] = np.zeros_like(grad)
      if "Q" not in state:
        self.init_preconditioner(
            grad, state,
            precondition_frequency=group["precondition_frequency"],
            precondition_1d=group["precondition_1d"],
            shampoo_beta=(group["shampoo_beta"] if group["shampoo_beta"] >= 0
                          else group["betas"][1]),
            max_precond_dim=group["max_precond_dim"],
            merge_dims=group["merge_dims"])
        self.update_preconditioner(
            grad, state, max_precond_dim=group["max_precond_dim"],
            merge_dims=group["merge_dims"],
            precondition_1d=group["precondition_1d"])
        continue   # the first step only initialises the preconditioner

      grad_projected = self.project(grad, state,
                                    merge_dims=group["merge_dims"],
                                    max_precond_dim=group["max_precond_dim"])
      exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
      beta1, beta2 = group["betas"]
      state["step"] += 1
      exp_avg = exp_avg * beta1 + (1.0 - beta1) * grad_projected
      exp_avg_sq = exp_avg_sq * beta2 + (1.0 - beta2) * np.square(
          grad_projected)
      state["exp_avg"], state["exp_avg_sq"] = exp_avg, exp_avg_sq
      denom = np.sqrt(exp_avg_sq) + group["eps"]
      exp_avg_projected = exp_avg
      step_size = group["lr"]
      if group["correct_bias"]:
        bias_correction1 = 1.0 - beta1 ** (state["step"])
        bias_correction2 = 1.0 - beta2 ** (state["step"])
        step_size = step_size * (bias_correction2 ** .5) / bias_correction1
      norm_grad = self.project_back(exp_avg_projected / denom, state,
                                    merge_dims=group["merge_dims"],
                                    max_precond_dim=group["max_precond_dim"])
      if group["normalize_grads"]:
        norm_grad = norm_grad / (1e-30 + np.mean(norm_grad ** 2) ** 0.5)
      p = p + (-step_size) * norm_grad
      if group["weight_decay"] > 0.0:
        p = p + (-group["lr"] * group["weight_decay"]) * p
      self.params[index] = p
      self.update_preconditioner(
          grad, state, max_precond_dim=group["max_precond_dim"],
          merge_dims=group["merge_dims"],
          precondition_1d=group["precondition_1d"])
    return [p.copy() for p in self.params]

  def init_preconditioner(self, grad, state, precondition_frequency=10,
                          shampoo_beta=0.95, max_precond_dim=10000,
                          precondition_1d=False, merge_dims=False):
    state["GG"] = []
    if grad.ndim == 1:
      if not precondition_1d or grad.shape[0] > max_precond_dim:
        state["GG"].append([])
      else:
        state["GG"].append(np.zeros((grad.shape[0], grad.shape[0])))
    else:
      if merge_dims:
        grad = self.merge_dims(grad, max_precond_dim)
      for sh in grad.shape:
        if sh > max_precond_dim:
          state["GG"].append([])
        else:
          state["GG"].append(np.zeros((sh, sh)))
    state["Q"] = None
    state["precondition_frequency"] = precondition_frequency
    state["shampoo_beta"] = shampoo_beta

  def project(self, grad, state, merge_dims=False, max_precond_dim=10000):
    original_shape = grad.shape
    if merge_dims:
      if grad.ndim == 4 and self._data_format == "channels_last":
        permuted_shape = np.transpose(grad, (0, 3, 1, 2)).shape
      grad = self.merge_dims(grad, max_precond_dim)
    for mat in state["Q"]:
      if len(mat) > 0:
        grad = np.tensordot(grad, mat, axes=([0], [0]))
      else:
        permute_order = list(range(1, len(grad.shape))) + [0]
        grad = np.transpose(grad, permute_order)
    if merge_dims:
      if self._data_format == "channels_last" and len(original_shape) == 4:
        grad = np.transpose(grad.reshape(permuted_shape), (0, 2, 3, 1))
      else:
        grad = grad.reshape(original_shape)
    return grad

  def update_preconditioner(self, grad, state, max_precond_dim=10000,
                            merge_dims=False, precondition_1d=False):
    if state["Q"] is not None:
      state["exp_avg"] = self.project_back(
          state["exp_avg"], state, merge_dims=merge_dims,
          max_precond_dim=max_precond_dim)
    if grad.ndim == 1:
      if precondition_1d and grad.shape[0] <= max_precond_dim:
        gg = state["GG"][0]
        state["GG"][0] = gg + (1 - state["shampoo_beta"]) * (
            np.outer(grad, grad) - gg)
    else:
      new_grad = (self.merge_dims(grad, max_precond_dim) if merge_dims
                  else grad)
      for idx, sh in enumerate(new_grad.shape):
        if sh <= max_precond_dim:
          others = [*chain(range(idx), range(idx + 1, len(new_grad.shape)))]
          outer_product = np.tensordot(new_grad, new_grad,
                                       axes=(others, others))
          gg = state["GG"][idx]
          state["GG"][idx] = gg + (1 - state["shampoo_beta"]) * (
              outer_product - gg)
    if state["Q"] is None:
      state["Q"] = self.get_orthogonal_matrix(state["GG"])
    if state["step"] > 0 and state["step"] % state[
        "precondition_frequency"] == 0:
      state["Q"] = self.get_orthogonal_matrix_QR(state, max_precond_dim,
                                                 merge_dims)
    if state["step"] > 0:
      state["exp_avg"] = self.project(
          state["exp_avg"], state, merge_dims=merge_dims,
          max_precond_dim=max_precond_dim)

  def project_back(self, grad, state, merge_dims=False, max_precond_dim=10000):
    original_shape = grad.shape
    if merge_dims:
      if self._data_format == "channels_last" and grad.ndim == 4:
        permuted_shape = np.transpose(grad, (0, 3, 1, 2)).shape
      grad = self.merge_dims(grad, max_precond_dim)
    for mat in state["Q"]:
      if len(mat) > 0:
        grad = np.tensordot(grad, mat, axes=([0], [1]))
      else:
        permute_order = list(range(1, len(grad.shape))) + [0]
        grad = np.transpose(grad, permute_order)
    if merge_dims:
      if self._data_format == "channels_last" and len(original_shape) == 4:
        grad = np.transpose(grad.reshape(permuted_shape), (0, 2, 3, 1))
      else:
        grad = grad.reshape(original_shape)
    return grad

  def get_orthogonal_matrix(self, mat):
    final = []
    for m in mat:
      if len(m) == 0:
        final.append([])
        continue
      _, q = np.linalg.eigh(m + 1e-30 * np.eye(m.shape[0]))
      final.append(np.flip(q, [1]))
    return final

  def get_orthogonal_matrix_QR(self, state, max_precond_dim=10000,
                               merge_dims=False):
    precond_list = state["GG"]
    orth_list = state["Q"]
    orig_shape = state["exp_avg_sq"].shape
    if self._data_format == "channels_last" and len(orig_shape) == 4:
      permuted_shape = np.transpose(state["exp_avg_sq"], (0, 3, 1, 2)).shape
    if merge_dims:
      exp_avg_sq = self.merge_dims(state["exp_avg_sq"], max_precond_dim)
    else:
      exp_avg_sq = state["exp_avg_sq"]
    final = []
    for ind, (m, o) in enumerate(zip(precond_list, orth_list)):
      if len(m) == 0:
        final.append([])
        continue
      est_eig = np.diag(o.T @ m @ o)
      sort_idx = np.argsort(-est_eig, kind="stable")
      exp_avg_sq = np.take(exp_avg_sq, sort_idx, axis=ind)
      o = o[:, sort_idx]
      power_iter = m @ o
      q, _ = np.linalg.qr(power_iter)
      final.append(q)
    if merge_dims:
      if self._data_format == "channels_last" and len(orig_shape) == 4:
        exp_avg_sq = np.transpose(exp_avg_sq.reshape(permuted_shape),
                                  (0, 2, 3, 1))
      else:
        exp_avg_sq = exp_avg_sq.reshape(orig_shape)
    state["exp_avg_sq"] = exp_avg_sq
    return final
