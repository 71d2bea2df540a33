"""LeNet-5 (sigmoid by default, as in the original)."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from .layers import MONOTONE_ACTIVATIONS, Conv, dense, flatten, get_activation, materialize, max_pool

# oneDNN's convs on one thread a piece, the batch in a piece a thread of XLA's pool
# (layers.Conv.onednn_pieces), rather than on all of oneDNN's OpenMP threads: 2-core AVX-512 Xeon,
# in one process (tools/ab_bench.py), the first conv (all oneDNN then took, from batch 84) at
# batch 128 1.053x (11 of 11 rounds faster), 1.045x (6 of 7), four pieces 1.052x; both convs so,
# against the first only at 128 1.23x (9 of 9), against the banded matmul at 32 1.37x (9 of 9).
ONEDNN_THREADS = 1
ONEDNN_PIECES = 0
# Per conv, its width folded into channels (onednn.conv_folded): the first's 6 output channels fill
# 6 of 16 vector lanes; folded by 2 (a 6->12 5x3 conv) its forward and kernel gradient each ran
# 1.6x faster alone (one thread, 64 images) and LeNet-5 trained 1.12x faster at batch 128, 1.07x
# at 32 (9 of 9 rounds each); folded by 4 1.00x at 32; the second folded too (16->32) 0.98x.
ONEDNN_FOLD = (2, 1)
# Each conv's bias and activation after its 2x2 max pool, where they commute (non-decreasing
# activations, layers.MONOTONE_ACTIVATIONS: the same outputs): on a quarter of the pixels, and the
# bias gradient summed over the pooled map. 1.05x at batch 128, 1.10x at 32 (9 of 9 rounds each);
# then the pool written once and the activation's output not: 1.097x at 128 (11 of 11), 0.999x at
# 32 (6 of 13); both written 1.055x (9 of 11) / 0.984x (4 of 13).
POOL_BEFORE_ACTIVATION = True


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
        # The pool written once: XLA:CPU otherwise fuses it into its reader and recomputes it (in
        # every patch of the next conv; in the activation's row view, layers.channelwise, read
        # through a reshape, which made the first conv's bias + sigmoid 4x slower).
        pool = lambda y: materialize(max_pool(y, 2, 2, impl=self.pool))
        pool_first = POOL_BEFORE_ACTIVATION and self.activation in MONOTONE_ACTIVATIONS
        for features, fold in zip((6, 16), ONEDNN_FOLD):
            x = Conv(features, 5, padding='VALID', dtype=self.dtype, impl=self.conv, activation=act,
                     onednn_threads=ONEDNN_THREADS, onednn_pieces=ONEDNN_PIECES, onednn_fold=fold,
                     pool=pool if pool_first else None)(x)
            if not pool_first:
                x = pool(x)
        x = flatten(x)
        for features in (120, 84):
            x = act(dense(features, self.dtype)(x))
        return dense(self.num_classes, self.dtype)(x).astype(jnp.float32)
