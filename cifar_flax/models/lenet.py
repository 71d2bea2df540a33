"""LeNet-5 (sigmoid by default, as in the original)."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from .layers import Conv, dense, flatten, get_activation, materialize, max_pool


class LeNet5(nn.Module):
    num_classes: int = 10
    activation: str = 'sigmoid'
    dtype: Any = jnp.float32
    conv: str = 'auto'
    pool: str = 'auto'

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        act = get_activation(self.activation)
        x = x.astype(self.dtype)
        for features in (6, 16):
            x = Conv(features, 5, padding='VALID', dtype=self.dtype, impl=self.conv, activation=act)(x)
            # written once: XLA:CPU otherwise fuses the pool into its reader and recomputes it
            # (for the first pool, in every patch of the next conv)
            x = materialize(max_pool(x, 2, 2, impl=self.pool))
        x = flatten(x)
        for features in (120, 84):
            x = act(dense(features, self.dtype)(x))
        return dense(self.num_classes, self.dtype)(x).astype(jnp.float32)
