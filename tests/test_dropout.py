"""The counter-hash dropout (`model.dropout_impl="hash"`): its bits against an
independent reference, the statistics a dropout mask needs, its gradient,
what it keeps for the backward, and that the option reaches every dropout
of the model."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avsegformer_jax import avsegformer, build_model, dropout, layers
from configs import tiny

M32 = 0xFFFFFFFF


def _lowbias32(x: int) -> int:
  """Wellons' lowbias32 on a Python int: the reference for `mix32`."""
  x ^= x >> 16
  x = (x * 0x7FEB352D) & M32
  x ^= x >> 15
  x = (x * 0x846CA68B) & M32
  return x ^ (x >> 16)


def _reference_bits(seed, shape, lo_bits=32):
  """Element by element in Python ints: row-major index split into the
  trailing axes that fit 2**lo_bits (lo) and the leading ones (hi)."""
  k = next(k for k in range(len(shape) + 1)
           if np.prod(shape[k:], dtype=np.int64) <= 2 ** lo_bits)
  lo_size = int(np.prod(shape[k:], dtype=np.int64))
  out = []
  for i in range(int(np.prod(shape))):
    hi, lo = divmod(i, lo_size)
    second = seed[1] ^ (_lowbias32(hi) if k else 0)
    out.append(_lowbias32((_lowbias32(lo ^ seed[0]) + second) & M32))
  return np.asarray(out, np.uint32).reshape(shape)


def test_mix32_is_lowbias32():
  xs = [0, 1, 2, 3, 0x7FFFFFFF, 0x80000000, M32, 123456789]
  got = dropout.mix32(jnp.asarray(xs, jnp.uint32))
  np.testing.assert_array_equal(got, [_lowbias32(x) for x in xs])
  # A bijection: no two of 2**16 consecutive inputs collide.
  ys = np.asarray(dropout.mix32(jnp.arange(2 ** 16, dtype=jnp.uint32)))
  assert len(np.unique(ys)) == 2 ** 16


@pytest.mark.parametrize("shape,lo_bits", [((3, 5, 7), 32), ((6, 5, 8), 5),
                                           ((4, 3, 20), 6)])
def test_hash_bits_match_reference(monkeypatch, shape, lo_bits):
  """Including tensors past the counter width (shrunk here from 2**32):
  the leading axes' index becomes the second word, so no element repeats
  another's bits."""
  monkeypatch.setattr(dropout, "_LO_BITS", lo_bits)
  seed = (0x9E3779B9, 12345)
  got = np.asarray(jax.jit(dropout.hash_bits, static_argnums=1)(
      jnp.asarray(seed, jnp.uint32), shape))
  np.testing.assert_array_equal(got, _reference_bits(seed, shape, lo_bits))
  assert len(np.unique(got)) == got.size


def test_hash_mask_statistics():
  """Keep rate, bit balance, and no dependence between neighbours (along
  either axis) or between two keys' masks: what dropout needs from its bits."""
  shape, n = (1000, 1024), 1000 * 1024
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  seeds = [jax.random.bits(k, (2,), jnp.uint32) for k in keys]
  for p in (0.5, 0.9, 0.999):
    keep = np.asarray(dropout.hash_keep(seeds[0], shape, p))
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(keep.mean() - p) < 5 * sigma, (p, keep.mean())
  bits = np.asarray(dropout.hash_bits(seeds[0], shape))
  ones = (bits[..., None] >> np.arange(32, dtype=np.uint32)) & 1
  assert np.abs(ones.mean((0, 1)) - 0.5).max() < 5 * 0.5 / np.sqrt(n)
  p = 0.5
  a = np.asarray(dropout.hash_keep(seeds[0], shape, p))
  b = np.asarray(dropout.hash_keep(seeds[1], shape, p))
  for both, count in ((a[:, 1:] & a[:, :-1], a[:, 1:].size),
                      (a[1:] & a[:-1], a[1:].size), (a & b, a.size)):
    assert abs(both.mean() - p * p) < 5 * np.sqrt(p * p * (1 - p * p) / count)


def test_hash_dropout_values_and_gradient():
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 300, 64), jnp.bfloat16)
  seed = jnp.asarray([7, 11], jnp.uint32)
  keep = dropout.hash_keep(seed, x.shape, 0.9)
  y, vjp = jax.vjp(lambda x: dropout.hash_dropout(x, seed, 0.9), x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(y, jnp.where(keep, x / 0.9, 0))
  g = jax.random.normal(jax.random.PRNGKey(2), x.shape, jnp.bfloat16)
  np.testing.assert_array_equal(vjp(g)[0], jnp.where(keep, g / 0.9, 0))
  # The backward keeps only the 2 seed words: no mask, no bits.
  saved = [r.shape for r in jax.tree.leaves(vjp)]
  assert saved and all(np.prod(s) <= 2 for s in saved), saved
  # (the bernoulli layer keeps its [8, 300, 64] mask; the check can see it)
  _, vjp_b = jax.vjp(lambda x: layers.Dropout(0.1).apply(
      {}, x, rngs={"dropout": jax.random.PRNGKey(0)}), x)
  assert x.shape in [r.shape for r in jax.tree.leaves(vjp_b)]


def test_dropout_module_hash_impl():
  """Deterministic per key, different keys and layers draw different masks,
  remat (both policies) gives the same gradients without keeping a mask,
  and a bad name is refused by its option."""
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 64, 32))

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      drop = lambda r: layers.Dropout(r, impl="hash")     # noqa: E731
      y = drop(0.1)(nn.Dense(32)(x))
      return drop(0.1)(jnp.tanh(y))

  params = Block().init({"params": jax.random.PRNGKey(1),
                         "dropout": jax.random.PRNGKey(2)}, x)
  run = lambda blk, k: blk.apply(                         # noqa: E731
      params, x, rngs={"dropout": jax.random.PRNGKey(k)})
  a, b, c = run(Block(), 3), run(Block(), 3), run(Block(), 4)
  np.testing.assert_array_equal(a, b)
  assert 0.15 < float((a == 0).mean()) < 0.23           # 1 - 0.9 ** 2
  assert 0.2 < float(((a == 0) != (c == 0)).mean())     # another key, other masks

  def grads(blk):
    f = lambda p: (blk.apply(p, x, rngs={"dropout": jax.random.PRNGKey(3)})
                   ** 2).sum()                             # noqa: E731
    return jax.grad(f)(params)
  want = grads(Block())
  for mode in ("full", "dots"):
    got = grads(layers.remat_module(Block, mode)())
    jax.tree.map(np.testing.assert_array_equal, got, want)
  with pytest.raises(ValueError, match="model.dropout_impl"):
    layers.Dropout(0.1, impl="philox").apply({}, x, rngs={
        "dropout": jax.random.PRNGKey(0)})


def _random_bits_sizes(jaxpr):
  sizes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "random_bits":
      sizes.append(int(np.prod(eqn.outvars[0].aval.shape)))
    for v in eqn.params.values():
      for j in (v if isinstance(v, (tuple, list)) else (v,)):
        if hasattr(j, "eqns") or hasattr(j, "jaxpr"):
          sizes += _random_bits_sizes(getattr(j, "jaxpr", j))
  return sizes


def test_model_option_reaches_every_dropout():
  """With model.dropout_impl='hash' no random bits are drawn per element
  anywhere in the model (PVTv2's drop-path draws one number per frame; the
  hash layers draw 2 words each); with the default, the encoder's and
  decoder's dropouts draw per element."""
  config = tiny.get_config("pvt2")
  config.model.attention_dropout = 0.1     # the decoder's maps too
  n = 2
  frames = jnp.zeros((n, 64, 64, 3))
  audio = jnp.zeros((n, 96, 64))
  model = build_model(config)
  variables = avsegformer.init_variables(model, jax.random.PRNGKey(0))

  def sizes(cfg):
    f = lambda v: build_model(cfg).apply(                  # noqa: E731
        v, frames, audio, train=True,
        rngs={"dropout": jax.random.PRNGKey(0)})[0].sum()
    return _random_bits_sizes(jax.make_jaxpr(jax.grad(f))(variables).jaxpr)
  default = sizes(config)
  assert max(default) > 1000
  config.model.dropout_impl = "hash"
  hashed = sizes(config)
  assert max(hashed) <= max(n, 2), sorted(set(hashed))
  # every bernoulli dropout became a hash one: one 2-word draw each
  assert hashed.count(2) >= sum(s > max(n, 2) for s in default)
  config.model.dropout_impl = "xorshift"
  with pytest.raises(ValueError, match="model.dropout_impl"):
    build_model(config)


def test_hash_mask_is_computed_inside_scanned_layers():
  """Under jax.grad of a scan, JAX evaluates what depends on no loop input
  once, before the loop, and the loop reads it from memory. Nothing of the
  activation's size may be built that way (a [shape] iota of counters is 4
  bytes per element, more than the mask it replaces)."""
  x = jnp.zeros((4, 24, 16))

  class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      y = layers.Dropout(0.1, impl="hash")(nn.Dense(16)(x))
      return x + y, None

  for mode in (False, "full"):
    scanned = nn.scan(layers.remat_module(Layer, mode),
                      variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True}, length=3)
    model = scanned()
    params = model.init({"params": jax.random.PRNGKey(0),
                         "dropout": jax.random.PRNGKey(1)}, x, None)
    f = lambda p: model.apply(p, x, None, rngs={                # noqa: E731
        "dropout": jax.random.PRNGKey(2)})[0].sum()
    jaxpr = jax.make_jaxpr(jax.grad(f))(params).jaxpr
    big = [str(v.aval) for e in jaxpr.eqns if e.primitive.name != "scan"
           for v in e.outvars
           if v.aval.dtype == jnp.uint32 and v.aval.size >= x.size]
    assert not big, (mode, big)
    assert "scan" in [e.primitive.name for e in jaxpr.eqns]
