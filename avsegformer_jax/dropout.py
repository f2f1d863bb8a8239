"""Dropout with two mask generators (`model.dropout_impl`).

"bernoulli" (the default) is flax's `nn.Dropout`: `jax.random.bernoulli` with
the layer's key, so the same bits and outputs as flax. On a GPU those bits are
a kernel of their own (threefry ~80, Philox ~25 integer ops per word) whose
words go through memory before a second kernel compares them, and the keep
mask is kept for the backward (1 byte per element).

"hash" draws 64 bits per call from the layer's key and keeps an element when
a counter hash of its row-major index (two rounds of a 32-bit integer hash,
~25 integer ops with the index) falls under the keep probability. XLA fuses
that into the kernel that applies the mask: no bits or mask in memory,
forward or backward (the backward recomputes it from the two seed words).
Its masks are the same on every backend and XLA version, unlike "rbg"'s.
They are not flax's bits: a run with it does not reproduce a "bernoulli"
run's masks, only their statistics (tests/test_dropout.py).
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from avsegformer_jax import errors

DROPOUT_IMPLS = ("bernoulli", "hash")
DROPOUT_MASK = "dropout_mask"        # the name remat policies save

# Chris Wellons' "lowbias32" (hash-prospector): a bijection of uint32 in which
# every input bit flips every output bit with probability ~1/2.
_MIX = ((16, 0x7FEB352D), (15, 0x846CA68B), (16, None))
_LO_BITS = 32                        # counter width; tests shrink it


def mix32(x):
  """lowbias32 on a uint32 array (numpy or jax)."""
  for shift, mult in _MIX:
    x = x ^ (x >> shift)
    if mult is not None:
      x = x * x.dtype.type(mult)
  return x


def _split_axis(shape) -> int:
  """First axis k with prod(shape[k:]) <= 2**_LO_BITS: the trailing axes
  index the low counter word, the leading ones a second word (only for
  tensors of more than 2**32 elements)."""
  return next(k for k in range(len(shape) + 1)
              if math.prod(shape[k:]) <= 2 ** _LO_BITS)


def _row_major(shape, axes, strides):
  """uint32 row-major index over `axes` of a `shape` broadcast, as a sum of
  per-axis [d] vectors times `strides` (traced values, see `hash_bits`)."""
  idx = None
  for a, st in zip(axes, strides):
    term = jax.lax.broadcast_in_dim(
        jax.lax.iota(jnp.uint32, shape[a]) * st, shape, (a,))
    idx = term if idx is None else idx + term
  return idx


def _strides(shape, axes):
  return [math.prod(shape[a + 1:axes[-1] + 1]) for a in axes]


def hash_bits(seed, shape):
  """uint32 [shape]: mix32(mix32(lo ^ seed[0]) + (seed[1] ^ mix32(hi))), lo/hi
  the element's row-major index split at 2**32 (hi = 0, and not computed, below
  that). seed: uint32 [2].

  Nothing of [shape] may be computable without the seed: under `jax.grad`
  of a scan (the scanned layers), JAX evaluates every value that depends on
  no loop input once, outside the loop, and the loop then reads it from
  memory (an iota of [shape] is 4 bytes per element). So the per-axis
  iotas stay [d]-sized and their strides pass through an optimization
  barrier with the seed: the products depend on it, for JAX and XLA alike."""
  shape = tuple(shape)
  if any(d >= 2 ** _LO_BITS for d in shape):
    raise ValueError(f"hash dropout: axis longer than 2**{_LO_BITS} in {shape}")
  if not shape:
    return hash_bits(seed, (1,)).reshape(())
  k = _split_axis(shape)
  lo_axes, hi_axes = list(range(k, len(shape))), list(range(k))
  strides = np.asarray(_strides(shape, lo_axes) +
                       (_strides(shape, hi_axes) if k else []), np.uint32)
  seed, strides = jax.lax.optimization_barrier((seed, jnp.asarray(strides)))
  n = len(lo_axes)
  lo = _row_major(shape, lo_axes, [strides[i] for i in range(n)])
  second = seed[1]
  if k:
    hi = _row_major(shape, hi_axes, [strides[n + i] for i in range(k)])
    second = second ^ mix32(hi)
  return mix32(mix32(lo ^ seed[0]) + second)


def _threshold(keep_prob: float) -> np.uint32:
  return np.uint32(min(round(keep_prob * 2.0 ** 32), 2 ** 32 - 1))


def hash_keep(seed, shape, keep_prob: float):
  """bool [shape]; P(True) = keep_prob to within 2**-32."""
  return hash_bits(seed, shape) < _threshold(keep_prob)


def _apply(keep, x, keep_prob: float):
  """x / keep_prob where `keep`, else 0 (flax's nn.Dropout)."""
  return jax.lax.select(keep, x / keep_prob, jnp.zeros_like(x))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def hash_dropout(x, seed, keep_prob: float):
  """`_apply` with `hash_keep`; its gradient is the same select on the
  cotangent, with only the seed kept for it."""
  return _apply(hash_keep(seed, x.shape, keep_prob), x, keep_prob)


def _hash_dropout_fwd(x, seed, keep_prob):
  return hash_dropout(x, seed, keep_prob), seed


def _hash_dropout_bwd(keep_prob, seed, g):
  return hash_dropout(g, seed, keep_prob), None


hash_dropout.defvjp(_hash_dropout_fwd, _hash_dropout_bwd)


def check_impl(impl: str) -> str:
  if impl not in DROPOUT_IMPLS:
    raise errors.ConfigError(f"model.dropout_impl must be one of {DROPOUT_IMPLS}, "
                     f"got {impl!r}")
  return impl


class Dropout(nn.Module):
  """Dropout by `impl`. "bernoulli" is flax's `nn.Dropout` (same random bits,
  same outputs) with its keep mask named, so rematerialisation keeps it
  (1 byte per element) instead of drawing it again: on a GPU the bits cost
  more than storing and reading the mask (benchmarks/README.md). "hash" needs
  neither: the mask is recomputed where it is used."""
  rate: float
  deterministic: bool = False
  impl: str = "bernoulli"

  @nn.compact
  def __call__(self, x):
    if self.deterministic or self.rate == 0.0:
      return x
    keep_prob = 1.0 - self.rate
    key = self.make_rng("dropout")
    if check_impl(self.impl) == "hash":
      return hash_dropout(x, jax.random.bits(key, (2,), jnp.uint32), keep_prob)
    keep = jax.random.bernoulli(key, keep_prob, x.shape)
    return _apply(checkpoint_name(keep, DROPOUT_MASK), x, keep_prob)
