"""Per-layer timing of the 'hybrid' conv's training work (forward + input and kernel
gradients) with and without the Winograd kernel gradient, on the 3x3 stride-1 layer
shapes of ResNet-18 and VGG16.

    python tools/conv_layer_bench.py [--batch 128] [--reps 5]

Repetitions of the variants are interleaved (a noisy machine slows both alike) and the
median per variant is printed with the ratio native / Winograd.
"""

from __future__ import annotations

import argparse
from unittest import mock

import jax
import jax.numpy as jnp

from cifar_flax.bench import interleaved_medians
from cifar_flax.models import layers

# (map size, channels in = out) of the 3x3 stride-1 SAME convolutions in ResNet-18 / VGG16.
SHAPES = ((32, 64), (16, 128), (8, 256), (4, 512))
NEVER = 10 ** 9


def training_work(min_size: int):
    """jit of the conv's value and (x, kernel) gradients, Winograd threshold fixed at trace time
    (oneDNN off: these are the XLA forms; tools/onednn_layer_bench.py compares oneDNN with them)."""
    def loss(x, kernel):
        return jnp.sum(jnp.square(layers.conv_hybrid(x, kernel)))

    def run(x, kernel):
        with mock.patch.multiple(layers, WINOGRAD_MIN_SIZE=min_size, ONEDNN_CONV=False):
            return jax.value_and_grad(loss, (0, 1))(x, kernel)
    return jax.jit(run)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--reps', type=int, default=5)
    args = p.parse_args(argv)
    print(f'batch {args.batch}, median of {args.reps} interleaved repetitions, fwd + dx + dkernel')
    for size, channels in SHAPES:
        x = jax.random.normal(jax.random.key(0), (args.batch, size, size, channels))
        kernel = jax.random.normal(jax.random.key(1), (3, 3, channels, channels)) * 0.05
        variants = {'native': training_work(NEVER), 'winograd': training_work(1)}
        med = interleaved_medians(variants, (x, kernel), args.reps)
        print(f'{size}x{size}x{channels}: native dk {1e3 * med["native"]:.1f} ms, '
              f'Winograd dk {1e3 * med["winograd"]:.1f} ms, ratio {med["native"] / med["winograd"]:.2f}x',
              flush=True)


if __name__ == '__main__':
    main()
