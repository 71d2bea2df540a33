"""Inception-10 (a small GoogLeNet): four 4-branch blocks on a 16-filter stem."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from .. import config
from .layers import Conv, batch_norm, conv_batch_norm, dense, get_activation, global_avg_pool, materialize, max_pool

BN_MODES = config.BN_MODES
# oneDNN's threads for the branches' convs (layers.Conv.onednn_threads): one, so that XLA runs
# the four branches' layers side by side on the cores. In one process (tools/ab_bench.py), oneDNN
# for the branches' 3x3s and 5x5s, against XLA's forms: batch 32 1.33x on one thread, 0.91x on
# both; each on one thread against those of 32 channels on both: 1.20x at 32, 1.14x at 128.
# Where XLA has no other branch to run beside one (the 5x5s, the longest, finish last) a core sat
# idle: each call's batch is split into a piece a thread of XLA's pool (ONEDNN_PIECES), which
# an idle thread takes (layers.Conv.onednn_pieces; not measured on more than 2 cores). 2-core
# AVX-512 Xeon, in one process, against one piece: batch 128 1.05x, 1.07x and 1.10x (9 of 9, 6 of
# 7, 6 of 7 rounds faster), batch 32 1.02x and 1.04x (8 of 11, 8 of 9); the 5x5s alone 1.07x at
# 128; four pieces 1.00x of two. (Split in the model instead, halves joined by a concatenate:
# 5x5s 1.055x, 3x3s too 0.94x.) The stem, which runs alone, on all threads against one: 1.009x at
# 128 (6 of 9), 1.007x at 32 (7 of 11); against one thread in pieces 1.03x at 128.
ONEDNN_THREADS = 1
ONEDNN_PIECES = 0
STEM_ONEDNN_THREADS = 0


class ConvBNAct(nn.Module):
    """CBA(c, k, s): Conv c kxk stride s 'same' -> BN -> act."""
    features: int
    kernel_size: int
    strides: int = 1
    activation: str = 'relu'
    dtype: Any = jnp.float32
    conv: str = 'auto'
    frozen_bn: bool = False
    stem: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        onednn = dict(onednn_threads=STEM_ONEDNN_THREADS, onednn_pieces=1) if self.stem else dict(
            onednn_threads=ONEDNN_THREADS, onednn_pieces=ONEDNN_PIECES)
        conv = Conv(self.features, self.kernel_size, self.strides, padding='SAME',
                    dtype=self.dtype, impl=self.conv, **onednn)
        return conv_batch_norm(conv, batch_norm(train, self.dtype, frozen=self.frozen_bn), x,
                               activation=get_activation(self.activation))


class InceptionBlock(nn.Module):
    features: int
    strides: int
    activation: str = 'relu'
    dtype: Any = jnp.float32
    conv: str = 'auto'
    pool: str = 'auto'
    frozen_bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        def cba(k, s=1):
            return ConvBNAct(self.features, k, s, self.activation, self.dtype, self.conv, self.frozen_bn)

        s = self.strides
        b1 = cba(1, s)(x, train)
        b2 = cba(3)(cba(1, s)(x, train), train)
        b3 = cba(5)(cba(1, s)(x, train), train)
        # 3x3 'same' pooling then a stride-s 1x1 conv, computed as pooling at stride s
        # (the windows centred on the pixels the conv keeps) then a stride-1 1x1 conv:
        # identical outputs, 1/s^2 of the pooling work.
        pooled = max_pool(x, 3, s, padding=((1, 1), (1, 1)), impl=self.pool)
        b4 = cba(1)(pooled, train)
        return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class Inception10(nn.Module):
    num_classes: int = 10
    activation: str = 'relu'
    dtype: Any = jnp.float32
    conv: str = 'auto'
    pool: str = 'auto'
    bn: str = 'batch'

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.bn not in BN_MODES:
            raise ValueError(f'unknown bn mode {self.bn!r}; valid: {list(BN_MODES)}')
        frozen = self.bn == 'frozen'
        x = x.astype(self.dtype)
        x = ConvBNAct(16, 3, 1, self.activation, self.dtype, self.conv, frozen, stem=True)(x, train)
        blocks = ((16, 2), (16, 1), (32, 2), (32, 1))
        for i, (features, strides) in enumerate(blocks):
            x = InceptionBlock(features, strides, self.activation, self.dtype, self.conv,
                               self.pool, frozen)(x, train)
            if i + 1 < len(blocks):
                # the next block reads x in three fusions (its pool, its 1x1 convs' operand,
                # the pool's argmax): written once instead of recomputed in each (materialize);
                # the last block's output has one reader, the global pooling
                x = materialize(x)
        x = global_avg_pool(x)
        return dense(self.num_classes, self.dtype)(x).astype(jnp.float32)
