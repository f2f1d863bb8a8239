"""VGGish (Hershey et al. 2017), AVSegFormer's audio backbone (paper Sec. 3.1).

log-mel [N, 96, 64] -> 128-d embedding. As the original's port: four conv
blocks (64, M, 128, M, 256, 256, M, 512, 512, M), flatten in NHWC order
(6*4*512 = 12288, which NHWC gives for free), three ReLU FCs, no PCA.
Always frozen in AVSegFormer (the model stops its gradient).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from avsegformer_jax import layers

# torch `features` Sequential: ints are 3x3 convs (+ ReLU), "M" max-pools.
CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M")
# He init for the random start (a ReLU stack of 11 layers: Xavier would shrink
# the embedding ~1e-4x, leaving a from-scratch audio path almost silent). Real
# runs load the released VGGish weights over it.
HE = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class VGGish(nn.Module):
  # The two hidden FCs' width: 4096 in the release (50M of its 72M weights).
  # Only tests narrow it, where no released weights are loaded.
  fc_dim: int = 4096
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    """x: [N, 96, 64] log-mel (frames x mel bands) -> [N, 128]."""
    del train
    x = x[..., None].astype(self.dtype)                        # [N,96,64,1]
    idx = 0                                  # index in torch's Sequential
    for item in CFG:
      if item == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        idx += 1
      else:
        x = nn.relu(layers.conv(item, 3, padding=1, dtype=self.dtype,
                                kernel_init=HE, name=f"features_{idx}")(x))
        idx += 2                             # conv, ReLU
    x = x.reshape(x.shape[0], -1)                              # [N, 12288]
    for i, width in ((0, self.fc_dim), (2, self.fc_dim), (4, 128)):
      x = nn.relu(layers.dense(width, dtype=self.dtype, kernel_init=HE,
                               name=f"embeddings_{i}")(x))
    return x
