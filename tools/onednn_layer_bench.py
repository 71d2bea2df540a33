"""Per-layer timing of oneDNN's convolution against the XLA forms, on every kxk conv of the networks.

    python tools/onednn_layer_bench.py [--batch 128] [--reps 7] [--models inception10 resnet18]

Records each network's conv shapes (input map, kernel, strides, padding) while tracing its
forward pass, then times forward + input and kernel gradients of one layer (jit, loss
sum(y^2)) through `conv_hybrid` with `layers.ONEDNN_CONV` off and on (thresholds lifted, so that
every shape goes to oneDNN). Repetitions are interleaved; medians and the speed-up are printed.
The figures behind `layers.ONEDNN_MIN_PIXELS` (docs/performance.md) came from this loop.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import jax
import jax.numpy as jnp

from cifar_flax import models
from cifar_flax.bench import interleaved_medians
from cifar_flax.models import layers, onednn


def conv_shapes(names, batch: int) -> collections.Counter:
    """(input map, kernel shape, strides, padding) -> count, over the networks' kxk convs."""
    shapes = collections.Counter()
    hybrid = layers.CONV_FUNCTIONS['hybrid']

    def record(x, kernel, strides=(1, 1), padding='SAME', **kwargs):
        if kernel.shape[:2] != (1, 1):
            shapes[(x.shape[1:], kernel.shape, tuple(strides), padding)] += 1
        return hybrid(x, kernel, strides, padding, **kwargs)

    with mock.patch.dict(layers.CONV_FUNCTIONS, hybrid=record):
        for name in names:
            model = models.get_model(name)
            jax.eval_shape(lambda m=model: m.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)},
                                                  jnp.zeros((batch, 32, 32, 3)), train=False))
    return shapes


def training_work(use_onednn: bool, strides, padding):
    """jit of the conv's value and (x, kernel) gradients, the oneDNN switch fixed at trace time."""
    def run(x, kernel):
        with mock.patch.multiple(layers, ONEDNN_CONV=use_onednn, ONEDNN_MIN_PIXELS=0):
            loss = lambda x, k: jnp.sum(jnp.square(layers.conv_hybrid(x, k, strides, padding)))
            return jax.value_and_grad(loss, (0, 1))(x, kernel)
    return jax.jit(run)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--reps', type=int, default=7)
    p.add_argument('--models', nargs='+', default=list(models.MODEL_NAMES))
    args = p.parse_args(argv)
    onednn.require()
    print(f'batch {args.batch}, median of {args.reps} interleaved repetitions, fwd + dx + dkernel')
    for (in_shape, kernel_shape, strides, padding), count in conv_shapes(args.models, args.batch).items():
        x = jax.random.normal(jax.random.key(0), (args.batch,) + in_shape)
        kernel = jax.random.normal(jax.random.key(1), kernel_shape) * 0.05
        variants = {'xla': training_work(False, strides, padding), 'onednn': training_work(True, strides, padding)}
        med = {name: 1e3 * t for name, t in interleaved_medians(variants, (x, kernel), args.reps).items()}
        print(f'{in_shape} kernel {kernel_shape} strides {strides} {padding} (x{count}): XLA forms '
              f'{med["xla"]:.2f} ms, oneDNN {med["onednn"]:.2f} ms, {med["xla"] / med["onednn"]:.2f}x', flush=True)


if __name__ == '__main__':
    main()
