"""ResNet-18 for 32x32 inputs (3x3 stem, no stem pooling)."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from .layers import Conv, batch_norm, dense, get_activation, global_avg_pool


class BasicBlock(nn.Module):
    features: int
    strides: int = 1
    activation: str = 'relu'
    dtype: Any = jnp.float32
    conv: str = 'auto'

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        act = get_activation(self.activation)

        def conv(k, s=1):
            return Conv(self.features, k, s, padding='SAME', use_bias=False, dtype=self.dtype, impl=self.conv)

        y = act(batch_norm(train, self.dtype)(conv(3, self.strides)(x)))
        y = batch_norm(train, self.dtype)(conv(3)(y))
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = batch_norm(train, self.dtype)(conv(1, self.strides)(x))
        return act(y + shortcut)


class ResNet18(nn.Module):
    num_classes: int = 10
    activation: str = 'relu'
    dtype: Any = jnp.float32
    conv: str = 'auto'
    pool: str = 'auto'  # unused (no pooling layers besides the global average); kept for a uniform interface

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        act = get_activation(self.activation)
        x = x.astype(self.dtype)
        x = Conv(64, 3, padding='SAME', use_bias=False, dtype=self.dtype, impl=self.conv)(x)
        x = act(batch_norm(train, self.dtype)(x))
        for stage, features in enumerate((64, 128, 256, 512)):
            for block in range(2):
                strides = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(features, strides, self.activation, self.dtype, self.conv)(x, train)
        x = global_avg_pool(x)
        return dense(self.num_classes, self.dtype)(x).astype(jnp.float32)
