"""The official μP learning-rate rule, ported line by line to Python floats.

Source: https://github.com/charliezchen/scaling-matrix-preconditioning,
file ``train.py`` at commit 5a02d4f3a3532cf9b77ea6435cd1d5db278abf54 ("add
wandb links"), the code of Qiu, Chen et al., "Hyperparameter Transfer
Enables Consistent Gains of Matrix-Preconditioned Optimizers Across
Scales" (NeurIPS 2025). `compute_nb` and `assign_lr` mirror the nested
functions of the same names in ``train_and_evaluate``, statement by
statement; the ``cfg`` fields they read become arguments (``lr``,
``embed_lr_mult``, ``readout_lr_mult``, ``mup``, ``depth_mup``,
``block_size``, ``max_precond_dim``), ``jnp.ceil`` becomes ``math.ceil``
(float64 instead of float32 arrays), and the spectral-normalisation branch
(which returns the base rate) is left out. ``N_scale`` is
``cfg.model.N / cfg.model.base_N`` for leaves whose path names neither
'embed' nor 'readout', else 1, as there.

Used only by the tests, as the ground truth of `foam_optax.mup_multipliers`.
"""

from __future__ import annotations

import math


def compute_nb(base_shape, shape, *, block_size, max_precond_dim):
  base_din, base_dout = base_shape
  din, dout = shape
  # one block if exceeding max precond dim
  base_nb_in = math.ceil(base_din / block_size) if base_din <= max_precond_dim else 1
  base_nb_out = math.ceil(base_dout / block_size) if base_dout <= max_precond_dim else 1
  nb_in = math.ceil(din / block_size) if din <= max_precond_dim else 1
  nb_out = math.ceil(dout / block_size) if dout <= max_precond_dim else 1
  # normalize relative to base
  return nb_in / base_nb_in, nb_out / base_nb_out


def assign_lr(base_shape, shape, N_scale, nb_in, nb_out, opt_name, path_str, *,
              lr=1.0, embed_lr_mult=1.0, readout_lr_mult=1.0, mup=True,
              depth_mup=True, max_precond_dim=10000):
  base_lr = lr

  if 'embed' in path_str:
    base_lr *= embed_lr_mult
  elif 'readout' in path_str:
    base_lr *= readout_lr_mult

  if not mup:
    return base_lr

  base_din, base_dout = base_shape
  din, dout = shape

  base_in_active = base_din <= max_precond_dim
  base_out_active = base_dout <= max_precond_dim
  in_active = din <= max_precond_dim
  assert in_active == base_in_active, "Precondition input active must be the same as base"
  out_active = dout <= max_precond_dim
  assert out_active == base_out_active, "Precondition output active must be the same as base"
  assert in_active or out_active, "At least one side must be active"

  # normalize realtive to base
  din, dout = din / base_din, dout / base_dout

  if not depth_mup:
    N = 1
  else:
    N = N_scale

  if opt_name in ['adam', 'adamuon', 'adamuon_rms_align', 'muon_adam']:
    mult = 1 / din
  elif opt_name == 'muon':
    mult = (dout / din) ** 0.5
  elif opt_name in ['shampoo', 'shampoo2']:
    k = 1/4 if opt_name == 'shampoo' else 1/2
    if in_active and out_active:
      E = 2*k
    else:
      E = k
    mult = N ** (1 - 2*E) * (dout / din) ** (1 - E) * (nb_in * nb_out) ** -E
  elif opt_name == 'soap':
    if in_active and out_active:
      mult = (dout / din) ** 0.5 * (nb_in * nb_out) ** -0.5
    elif in_active:
      mult = (din * nb_in) ** -0.5
    else:
      mult = (dout / nb_out) ** 0.5 / din
  elif opt_name.startswith('grafted_shampoo'):
    mult = 1 / din
  elif opt_name == "sgd":
    mult = dout / din * N
  else: raise ValueError(f'Unknown optimiser {opt_name}')

  return base_lr * mult


def official_multiplier(base_shape, shape, opt_name, path_str, *,
                        block_size, max_precond_dim, depth_ratio):
  """`assign_lr` at lr 1 as `train_and_evaluate` calls it: block counts from
  `compute_nb`, ``N_scale`` from the path (1 for 'embed' and 'readout')."""
  nb_in, nb_out = compute_nb(base_shape, shape, block_size=block_size,
                             max_precond_dim=max_precond_dim)
  is_bulk = not ('embed' in path_str or 'readout' in path_str)
  N_scale = depth_ratio if is_bulk else 1
  return assign_lr(base_shape, shape, N_scale, nb_in, nb_out, opt_name,
                   path_str, max_precond_dim=max_precond_dim)
