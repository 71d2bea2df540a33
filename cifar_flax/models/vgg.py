"""VGG-16 with BatchNorm after every conv and light dropout (Keras CIFAR variant)."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from .layers import Conv, batch_norm, conv_batch_norm, dense, flatten, get_activation, max_pool

VGG16_GROUPS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG16(nn.Module):
    num_classes: int = 10
    activation: str = 'relu'
    dtype: Any = jnp.float32
    conv: str = 'auto'
    pool: str = 'auto'
    dropout: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        act = get_activation(self.activation)
        x = x.astype(self.dtype)
        for group in VGG16_GROUPS:
            for features in group:
                conv = Conv(features, 3, padding='SAME', dtype=self.dtype, impl=self.conv)
                x = act(conv_batch_norm(conv, batch_norm(train, self.dtype), x))
            x = max_pool(x, 2, 2, padding='SAME', impl=self.pool)
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = flatten(x)
        for _ in range(2):
            x = act(dense(512, self.dtype)(x))
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return dense(self.num_classes, self.dtype)(x).astype(jnp.float32)
