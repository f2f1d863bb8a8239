"""ResNet-50 as AVSegFormer uses it (the `B2_ResNet` variant, branch 1).

Strides 4/8/16/32 with 256/512/1024/2048 channels; the stride sits on the 3x3
conv of each bottleneck (torchvision's "v1.5"). The original also builds a
second branch (layer3_2, layer4_2) that never runs; the port does not hold it
(the converter reports its keys as unused).

BatchNorm uses running statistics in eval and batch statistics in training,
updating the running ones (momentum 0.1 as torch) even while the backbone is
frozen, as the original does. One difference: torch stores the *unbiased*
batch variance in its running average, Flax the biased one (a factor
n/(n-1), n = N*H*W per channel, negligible at these sizes).
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from avsegformer_jax import layers

DEPTHS = (3, 4, 6, 3)
WIDTHS = (64, 128, 256, 512)


def _bn(train, dtype, name, axis_name=None):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, dtype=dtype, use_fast_variance=False,
                      axis_name=axis_name if train else None, name=name)


class Bottleneck(nn.Module):
  planes: int
  stride: int = 1
  downsample: bool = False
  train: bool = False
  axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, s, p, n: layers.conv(
        f, k, stride=s, padding=p, use_bias=False, dtype=self.dtype, name=n,
        kernel_init=nn.initializers.kaiming_normal())
    bn = lambda n: _bn(self.train, self.dtype, n, self.axis_name)
    y = nn.relu(bn("bn1")(conv(self.planes, 1, 1, 0, "conv1")(x)))
    y = nn.relu(bn("bn2")(conv(self.planes, 3, self.stride, 1, "conv2")(y)))
    y = bn("bn3")(conv(self.planes * 4, 1, 1, 0, "conv3")(y))
    if self.downsample:
      x = bn("downsample_1")(
          conv(self.planes * 4, 1, self.stride, 0, "downsample_0")(x))
    return nn.relu(x + y)


class ResNet50(nn.Module):
  """frames [N,H,W,3] -> 4 NHWC feature maps (strides 4, 8, 16, 32).

  `axis_name`: batch statistics are averaged over this mesh axis in training
  (synchronised BN), so N devices see the statistics of the global batch.
  """
  dtype: jnp.dtype = jnp.float32
  remat: bool | str = False         # layers.remat_module
  axis_name: str | None = None
  # Frames interact through batch statistics in training (see AVSegFormer).
  batch_statistics: ClassVar[bool] = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = layers.conv(64, 7, stride=2, padding=3, use_bias=False,
                    dtype=self.dtype, name="conv1",
                    kernel_init=nn.initializers.kaiming_normal())(x)
    x = nn.relu(_bn(train, self.dtype, "bn1", self.axis_name)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    block = layers.remat_module(Bottleneck, self.remat)
    # B2_ResNet names its branch-1 stages layer1, layer2, layer3_1, layer4_1.
    names = ("layer1", "layer2", "layer3_1", "layer4_1")
    outs = []
    for stage, (depth, planes) in enumerate(zip(DEPTHS, WIDTHS)):
      for i in range(depth):
        stride = 2 if (i == 0 and stage > 0) else 1
        x = block(planes, stride, downsample=(i == 0), train=train,
                  axis_name=self.axis_name, dtype=self.dtype, name=f"{names[stage]}_{i}")(x)
      outs.append(x)
    return outs
