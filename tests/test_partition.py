"""`fo.partition` and the aliases' routing: which parameters are
preconditioned, by name and by shape, and ASGO's official routing."""

import ast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import foam_optax as fo
import readme_blocks
from readme_blocks import recipe as _recipe
from readme_blocks import run as _run


def test_readme_partition_recipe_prints_the_split():
  ns, printed, expected = _run(_recipe("precondition_labels"))
  assert printed == expected and len(printed) == 1
  labels = ast.literal_eval(printed[0])
  assert labels["attention"]["bias"] == "diagonal"    # 2-D, but a bias
  assert labels["attention"]["kernel"] == "precondition"
  assert int(fo.stats(ns["state"])["num_factors"]) == 4


def test_partition_labels_by_name_and_shape():
  params = {"attn": {"bias": jnp.zeros((4, 16)), "kernel": jnp.zeros((8, 4))},
            "LayerNorm_0": {"scale": jnp.zeros((2, 8))},
            "token_embedder": jnp.zeros((50, 8)), "dense": jnp.zeros((8, 8)),
            "vector": jnp.zeros((8,)), "column": jnp.zeros((8, 1))}
  assert fo.precondition_labels(params) == {
      "attn": {"bias": "diagonal", "kernel": "precondition"},
      "LayerNorm_0": {"scale": "diagonal"}, "token_embedder": "diagonal",
      "dense": "precondition", "vector": "diagonal", "column": "diagonal"}
  # Empty patterns leave only the shape rule.
  shape_only = fo.precondition_labels(params, bias_and_norm_pattern="",
                                      embedding_pattern="")
  assert shape_only["attn"]["bias"] == "precondition"
  assert shape_only["token_embedder"] == "precondition"
  assert shape_only["vector"] == "diagonal"
  # The 2-D bias gets AdamW's update in fo.partition.
  tx = fo.partition(fo.foam(0.1), optax.adamw(0.1))
  bias_only = {"bias": params["attn"]["bias"]}
  grads = {"bias": jnp.ones((4, 16))}
  updates, _ = tx.update(grads, tx.init(bias_only), bias_only)
  adam, _ = optax.adamw(0.1).update(grads, optax.adamw(0.1).init(bias_only),
                                    bias_only)
  np.testing.assert_allclose(updates["bias"], adam["bias"], rtol=1e-6)


class _Transformer(nnx.Module):
  """The official ASGO runs' kinds of parameters, in Flax NNX layouts."""

  def __init__(self, rngs):
    self.token_emb = nnx.Embed(50, 16, rngs=rngs)
    self.pos_emb = nnx.Param(jnp.zeros((8, 16)))
    self.attention = nnx.MultiHeadAttention(num_heads=2, in_features=16,
                                            decode=False, rngs=rngs)
    self.ln_1 = nnx.LayerNorm(16, rngs=rngs)
    self.mlp = nnx.Linear(16, 64, rngs=rngs)


def test_asgo_routing_is_the_official_one():
  """Adam for what the official `get_optimizer_and_lr_scheduler` sends to
  it ('emb' in the name, or a vector), judging each bias by the PyTorch
  layout the official models have (a vector, here (heads, head_dim) in
  attention); ASGO for the rest. docs/reproduction.md and the docstrings
  route alike."""
  from official_asgo import official_route
  readme = next(b.code for b in readme_blocks.blocks()
                if "fo.asgo(lr)" in b.code)
  call = 'bias_and_norm_pattern="bias", embedding_pattern="emb"'
  squeeze = lambda text: " ".join(text.replace(">>>", "").replace(
      "...", "").split())
  for text in (readme, fo.asgo.__doc__, fo.dasgo.__doc__):
    assert call in squeeze(text)
  params = nnx.state(_Transformer(nnx.Rngs(0)), nnx.Param)
  namespace, _, _ = _run(readme)
  state = namespace["tx"].init(params)
  adam = [s for s in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)][0]
  to_adam = jax.tree.leaves(jax.tree.map(
      lambda m: not isinstance(m, optax.MaskedNode), adam.mu,
      is_leaf=lambda x: isinstance(x, optax.MaskedNode)))
  flat = jax.tree_util.tree_flatten_with_path(nnx.as_pure(params))[0]
  assert len(to_adam) == len(flat)
  for (path, leaf), adam_leaf in zip(flat, to_adam):
    name = jax.tree_util.keystr(path)
    torch_ndim = 1 if "bias" in name else leaf.ndim
    assert adam_leaf == (official_route(name, torch_ndim) == "adam"), name
  # The 2 embeddings, 4 attention biases, the norm's 2 vectors, 1 bias.
  assert sum(to_adam) == 9
