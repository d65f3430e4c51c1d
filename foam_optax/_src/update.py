"""`update` of `scale_by_foam`: checks, mesh handling and the skip wiring
around the leaf step (`leaves.update_tree`)."""

from __future__ import annotations

import warnings

import jax
import optax

from foam_optax._src import mesh
from foam_optax._src import layout
from foam_optax._src import leaves
from foam_optax._src import microbatches
from foam_optax._src import skipping
from foam_optax._src import validation
from foam_optax._src.config import Config, with_arguments
from foam_optax._src.state import ScaleByFoamState
from foam_optax._src.nnx import plain_arrays
from foam_optax._src.state import with_leaf_states


def _check_mesh(plan: layout.Plan, tree) -> None:
  """The state's plan against the mesh `update` runs under."""
  current = mesh.current_mesh(tree)
  if current is None:
    return
  if not plan.distributed:
    warnings.warn(
        f"foam_optax: updating under a mesh of {current.size} devices a state "
        "initialised without one: every device repeats every "
        "eigendecomposition. Initialise the state under the mesh (inside "
        "`with jax.set_mesh(mesh):`, or from parameters sharded on it).",
        stacklevel=4)
  elif dict(current.shape) != plan.shape:
    raise ValueError(
        f"the optimizer state was laid out for the mesh {plan.shape}"
        f" but is updated under {dict(current.shape)}; initialise it for this "
        "mesh, or move a saved state with `foam_optax.relayout`.")


def _specs(tree):
  return jax.tree.map(lambda x: jax.typeof(x).sharding.spec, tree)


def _apply(inputs, state: ScaleByFoamState, step, cfg: Config):
  """`inputs`: (updates, per leaf its microbatch gradients or None)."""
  updates, micro = inputs
  grads, treedef = jax.tree.flatten(updates)
  if treedef != jax.tree.structure(state.mu):
    raise ValueError(
        f"updates have the tree structure {treedef}, but the state was "
        f"initialised for {jax.tree.structure(state.mu)}.")
  new_updates, new_leaves, new_classes = leaves.update_tree(
      grads, state.leaf_states(), state.classes, step, cfg, state.plan,
      micro)
  return treedef.unflatten(new_updates), with_leaf_states(
      state, new_leaves)._replace(count=step, classes=new_classes)


def update(updates, state: ScaleByFoamState, cfg: Config, params=None,
           microbatch_grads=None):
  """The update of `scale_by_foam` for an already validated `Config`.

  The updates come back with exactly the structure of `updates`, and the
  state with that of `state`: wrappers such as Flax's ``nnx.Param`` stay
  (the computation runs on their leaves, in the same order).
  `microbatch_grads` feed the cross-fitting of ``bias_correction``; without
  it they are unused, which `microbatches.ignored` reports.
  """
  structure, state_structure = map(jax.tree.structure, (updates, state))
  updates, state = plain_arrays(updates), plain_arrays(state)
  validation.check_gradient_dtypes(updates)
  micro = None
  if cfg.bias_correction != "none":
    micro = microbatches.checked(
        microbatch_grads, updates, 4,
        f"bias_correction={cfg.bias_correction!r}", even=True)
  else:
    microbatches.ignored(microbatch_grads,
                         "this transformation (bias_correction='none')")
  _check_mesh(state.plan, state)
  validation.check_structure(list(state.layouts), cfg)
  run = with_arguments(_apply, cfg)
  explicit = mesh.typed_mesh((updates, state, params),
                                     single_device=True)
  if explicit is not None:
    # On Explicit axes every reshape of a sharded array would need its output
    # sharding spelled out; let the partitioner place the intermediates and
    # return every array with the sharding it came in with.
    def run(inputs, state, step, traced, inner=run):
      with jax.sharding.use_abstract_mesh(explicit):
        return jax.sharding.auto_axes(
            inner, out_sharding=(_specs(inputs[0]), _specs(state)))(
                inputs, state, step, traced)  # pyright: ignore[reportCallIssue]
  new_updates, new_state = skipping.run_or_skip(
      run, (updates, micro), state, optax.safe_increment(state.count),
      cfg.traced(), cfg, params)
  return (structure.unflatten(jax.tree.leaves(new_updates)),
          state_structure.unflatten(jax.tree.leaves(new_state)))
