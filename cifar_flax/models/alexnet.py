"""AlexNet-8 scaled to 32x32 inputs (5 convs, 3 dense)."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from .layers import Conv, batch_norm, conv_batch_norm, dense, flatten, get_activation, max_pool


class AlexNet8(nn.Module):
    num_classes: int = 10
    activation: str = 'relu'
    dtype: Any = jnp.float32
    conv: str = 'auto'
    pool: str = 'auto'
    dropout: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        act = get_activation(self.activation)
        x = x.astype(self.dtype)
        for features in (96, 256):
            conv = Conv(features, 3, padding='VALID', dtype=self.dtype, impl=self.conv)
            x = act(conv_batch_norm(conv, batch_norm(train, self.dtype), x))
            x = max_pool(x, 3, 2, impl=self.pool)
        for features in (384, 384, 256):
            x = act(Conv(features, 3, padding='SAME', dtype=self.dtype, impl=self.conv)(x))
        x = max_pool(x, 3, 2, impl=self.pool)
        x = flatten(x)
        for _ in range(2):
            x = act(dense(2048, self.dtype)(x))
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return dense(self.num_classes, self.dtype)(x).astype(jnp.float32)
