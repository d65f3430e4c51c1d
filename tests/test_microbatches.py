"""Per-microbatch gradients: `microbatch_grads`, checks of the microbatch
input, routing through partitions, and a warning where nothing uses them."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import foam_optax as fo
from helpers import MB_PARAMS, microbatched
from readme_blocks import recipe as _recipe
from readme_blocks import run as _run


def test_readme_bias_correction_recipe_trains_with_microbatch_grads():
  ns, printed, expected = _run(_recipe("microbatch_grads"))
  assert printed == expected == ["True"]
  # The recipe's optimizer is a corrected one: it refuses to run without
  # the per-microbatch gradients.
  with pytest.raises(ValueError, match="per-microbatch gradients"):
    ns["tx"].update(ns["params"], ns["state"], ns["params"])


def _updates_with_microbatches(tx, params=MB_PARAMS, micro=True):
  """The updates of three jitted steps, each given its microbatches (or
  not)."""
  state = tx.init(params)
  step = jax.jit(lambda g, s, m: tx.update(g, s, params, **(
      {"microbatch_grads": m} if micro else {})))
  out = []
  for i in range(3):
    grads, microbatches = (
        {k: tree[k] for k in params} for tree in microbatched(i))
    updates, state = step(grads, state, microbatches)
    out.append(updates)
  return out


def _matrix_part(lr=1e-2):
  return fo.foam(lr, bias_correction="cross_fit", check_frequency=1,
                 start_preconditioning_step=1)


# Per corrected part: the matrix and diagonal optimizers of the partition.
_PARTS = {
    "matrix": (_matrix_part, lambda: optax.adamw(1e-2)),
    "diagonal": (lambda: fo.foam(1e-2, check_frequency=1,
                                 start_preconditioning_step=1),
                 lambda: fo.bias_corrected_adamw(1e-2)),
}


@functools.cache
def _alone(corrected):
  """Each part's updates alone on its own leaves."""
  matrix, diagonal = _PARTS[corrected]
  return (_updates_with_microbatches(matrix(), {"w": MB_PARAMS["w"]},
                                     micro=corrected == "matrix"),
          _updates_with_microbatches(diagonal(), {"b": MB_PARAMS["b"]},
                                     micro=corrected == "diagonal"))


@pytest.mark.parametrize("wrap", [
    lambda matrix, diagonal: fo.partition(matrix, diagonal),
    # fo.partition is skip_nonfinite around optax.partition, which routes
    # the microbatches to each part as it does here: slow, covered by
    # "fo.partition".
    pytest.param(lambda matrix, diagonal: optax.partition(
        {"precondition": matrix, "diagonal": diagonal}, fo.precondition_labels),
                 marks=pytest.mark.slow),
    # optax's other name of optax.partition (the same function): slow too.
    pytest.param(lambda matrix, diagonal: optax.multi_transform(
        {"precondition": matrix, "diagonal": diagonal}, fo.precondition_labels),
                 marks=pytest.mark.slow),
], ids=["fo.partition", "optax.partition", "optax.multi_transform"])
@pytest.mark.parametrize("corrected", sorted(_PARTS))
def test_partitioned_optimizers_get_their_part_of_the_microbatches(
    wrap, corrected):
  """Each part of a partition steps exactly as it does alone on its own
  leaves, the bias-corrected one with its own part of the microbatches."""
  matrix, diagonal = _PARTS[corrected]
  with warnings.catch_warnings():
    # optax.partition of fo.foam, uncorrected, and a corrected AdamW: the
    # fo.foam alias cannot see that the AdamW uses the microbatches.
    warnings.filterwarnings("ignore", "foam_optax: microbatch_grads ignored")
    joint = _updates_with_microbatches(wrap(matrix(), diagonal()))
  alone_w, alone_b = _alone(corrected)
  for u, w, b in zip(joint, alone_w, alone_b):
    np.testing.assert_allclose(u["w"], w["w"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(u["b"], b["b"], rtol=1e-6, atol=1e-9)
  assert float(jnp.abs(joint[-1]["w"]).max()) > 0


def test_mismatched_microbatch_tree_under_partition_names_both():
  tx = fo.partition(_matrix_part(), optax.adamw(1e-2))
  grads, micro = microbatched(0)
  with pytest.raises(ValueError, match="microbatch_grads must have the "
                     "gradients' tree structure"):
    tx.update(grads, tx.init(MB_PARAMS), MB_PARAMS,
              microbatch_grads={"w": micro["w"]})


def _warnings_of(tx, micro=True):
  grads, microbatches = microbatched(0)
  state = tx.init(MB_PARAMS)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    # The warning comes at trace time: tracing is enough.
    jax.eval_shape(lambda g, s, m: tx.update(g, s, MB_PARAMS,
                                             microbatch_grads=m),
                   grads, state, microbatches if micro else None)
  return [str(w.message) for w in caught
          if "microbatch_grads ignored" in str(w.message)]


@pytest.mark.parametrize("make", [
    lambda: fo.foam(1e-2), lambda: fo.soap(1e-2), lambda: fo.asgo(1e-2),
    lambda: fo.dasgo(1e-2), lambda: fo.scale_by_foam(),
    lambda: fo.partition(fo.foam(1e-2), optax.adamw(1e-2)),
    lambda: optax.chain(fo.scale_by_shampoo(), optax.scale(-1e-2))],
    ids=["foam", "soap", "asgo", "dasgo", "scale_by_foam", "partition",
         "chain"])
def test_microbatches_that_nothing_uses_warn(make):
  messages = _warnings_of(make())
  assert len(messages) == 1, messages
  assert "bias_correction='cross_fit'" in messages[0]
  assert not _warnings_of(make(), micro=False)


@pytest.mark.parametrize("make", [
    _matrix_part, lambda: fo.bias_corrected_adamw(1e-2),
    lambda: fo.partition(_matrix_part(), optax.adamw(1e-2)),
    lambda: fo.partition(fo.foam(1e-2), fo.bias_corrected_adamw(1e-2))],
    ids=["foam_cross_fit", "bias_corrected_adamw", "partition_matrix",
         "partition_diagonal"])
def test_microbatches_that_one_part_uses_do_not_warn(make):
  assert not _warnings_of(make())


@pytest.mark.parametrize("make,micro,match", [
    (lambda: fo.bias_corrected_adamw(1e-3), None, "needs the per-microbatch"),
    (lambda: fo.shampoo(1e-3, bias_correction="cross_fit"), None,
     "needs the per-microbatch"),
    (lambda: fo.bias_corrected_adamw(1e-3),
     {"w": jnp.zeros((1, 4, 3))}, "at least 2"),
    (lambda: fo.foam(1e-3, bias_correction="cross_fit"),
     {"w": jnp.zeros((2, 4, 3))}, "at least 4"),
    (lambda: fo.bias_corrected_adamw(1e-3, method="two_group"),
     {"w": jnp.zeros((5, 4, 3))}, "an even number"),
    (lambda: fo.bias_corrected_adamw(1e-3),
     {"v": jnp.zeros((4, 4, 3))}, "tree structure"),
    (lambda: fo.bias_corrected_adamw(1e-3),
     {"w": jnp.zeros((4, 3, 4))}, "gradient's shape"),
])
def test_bad_microbatch_input_raises_at_trace_time(make, micro, match):
  tx = make()
  params = {"w": jnp.zeros((4, 3))}
  state = tx.init(params)
  with pytest.raises(ValueError, match=match):
    jax.jit(lambda s, m: tx.update(params, s, params,
                                   microbatch_grads=m))(state, micro)


def test_different_microbatch_counts_per_leaf_raise():
  tx = fo.bias_corrected_adamw(1e-3)
  params = {"a": jnp.zeros(3), "b": jnp.zeros(2)}
  with pytest.raises(ValueError, match="same number of microbatches"):
    tx.update(params, tx.init(params), params,
              microbatch_grads={"a": jnp.zeros((4, 3)),
                                "b": jnp.zeros((6, 2))})


def test_microbatch_grads_under_jit():
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
  x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 4)),
                  jnp.float32)
  loss_fn = lambda p, b: jnp.mean((b @ p["w"] + p["b"]) ** 2)
  loss, grads, micro = jax.jit(
      lambda p, b: fo.microbatch_grads(loss_fn, p, b, 4))(params, x)
  # The references jitted too: eagerly, every operation compiles apart.
  full_loss, full_grads = jax.jit(jax.value_and_grad(loss_fn))(params, x)
  np.testing.assert_allclose(loss, full_loss, rtol=1e-6)
  for g, f, m in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads),
                     jax.tree.leaves(micro)):
    np.testing.assert_allclose(g, f, rtol=1e-5, atol=1e-6)
    assert m.shape == (4,) + f.shape
  first = jax.jit(jax.grad(loss_fn))(params, x[:4])
  np.testing.assert_allclose(micro["w"][0], first["w"], rtol=1e-5)
  with pytest.raises(ValueError, match="does not split"):
    fo.microbatch_grads(loss_fn, params, x, 5)
