"""Building blocks shared by the networks: activations, a Conv with switchable
implementation, fast max pooling and Keras-style BatchNorm.

Why a custom Conv (measured on a 2-core AVX-512 CPU, jax 0.10, fwd+dx+dw per layer):
XLA:CPU's native convolution runs near matmul peak for most layers of these
networks at up to ~32 images per call, but (a) falls off a cliff (~1000x) when
the feature map is smaller than the kernel (VGG's 3x3 convs on 2x2 maps: 3 of
them cost ~6 s per batch of 128, hence the 8-15 img/s of a plain nn.Conv VGG16),
and (b) slows down 2-3x per image above ~32 images, mostly in the kernel
gradient. im2col + one matmul avoids (a) but pays for building the patches
(XLA:CPU's concat/slice fusions move only a few GB/s), so it loses to the native
conv on large maps. 'hybrid' (the CPU default) takes the best of each per layer,
and oneDNN's convolution (models/onednn.py, the library the peers use) where it is
installed and faster; on GPU the native convolution is used. ``Conv`` keeps the exact parameter
layout of ``flax.linen.Conv`` (``kernel`` (kh, kw, cin, cout), ``bias`` (cout,))
so checkpoints do not depend on the implementation.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import custom_batching, lax

from .. import config
from . import onednn

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'relu': nn.relu,
    'sigmoid': nn.sigmoid,
    'tanh': jnp.tanh,
    'gelu': nn.gelu,
    'silu': nn.silu,
    'elu': nn.elu,
    'leaky_relu': nn.leaky_relu,
}

# Non-decreasing: a max pool commutes with them (act(max z) == max act(z), also in floating point).
MONOTONE_ACTIVATIONS = frozenset({'relu', 'sigmoid', 'tanh', 'elu', 'leaky_relu'})

CONV_IMPLS = ('auto', 'xla', 'gemm', 'hybrid', 'onednn')
POOL_IMPLS = ('auto', 'xla', 'slices')
DTYPES = {name: getattr(jnp, name) for name in config.DTYPES}  # the names, as the CLIs take them

# Keras defaults, so that runs are comparable with the Keras reference code.
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3
default_kernel_init = nn.initializers.glorot_uniform()


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f'unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}') from None


def get_dtype(dtype: Any) -> Any:
    """'float32'/'bfloat16' (or the jnp types themselves) -> jnp dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f'unknown dtype {dtype!r}; valid: {sorted(DTYPES)}')
        return DTYPES[dtype]
    if jnp.dtype(dtype) not in {jnp.dtype(t) for t in DTYPES.values()}:
        raise ValueError(f'unknown dtype {dtype!r}; valid: {sorted(DTYPES)}')
    return dtype


def check_impl(impl: str, valid: Sequence[str], what: str) -> str:
    if impl not in valid:
        raise ValueError(f'unknown {what} implementation {impl!r}; valid: {list(valid)}')
    return impl


def resolve_conv_impl(impl: str) -> str:
    """'auto' -> the implementation measured fastest on the current backend.

    Decided at trace time: 'hybrid' on CPU (see conv_hybrid), the plain native
    convolution everywhere else (GPU/TPU).
    """
    check_impl(impl, CONV_IMPLS, 'conv')
    if impl != 'auto':
        return impl
    return 'hybrid' if jax.default_backend() == 'cpu' else 'xla'


def resolve_pool_impl(impl: str) -> str:
    """'auto' -> max over shifted slices on CPU (reduce_window's backward,
    select_and_scatter, is slow there), reduce_window elsewhere."""
    check_impl(impl, POOL_IMPLS, 'pool')
    if impl != 'auto':
        return impl
    return 'slices' if jax.default_backend() == 'cpu' else 'xla'


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _pads(in_hw, window, strides, padding: str):
    """TF/Keras 'SAME' or 'VALID' -> ((lo, hi), (lo, hi)) spatial padding."""
    padding = padding.upper()
    if padding not in ('SAME', 'VALID'):
        raise ValueError(f"unknown padding {padding!r}; valid: ['SAME', 'VALID']")
    return lax.padtype_to_pads(in_hw, window, strides, padding)


def _shifted_slices(x, window, strides, out_hw):
    """Yield the kh*kw strided views x[:, i::s, j::s, :] of size out_hw (row-major in (i, j))."""
    (kh, kw), (sh, sw), (oh, ow) = window, strides, out_hw
    for i in range(kh):
        for j in range(kw):
            yield lax.slice(
                x, (0, i, j, 0),
                (x.shape[0], i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, x.shape[3]),
                (1, sh, sw, 1))


def _out_hw(padded_hw, window, strides):
    return tuple((p - k) // s + 1 for p, k, s in zip(padded_hw, window, strides))


def conv_gemm(x: jax.Array, kernel: jax.Array, strides=(1, 1), padding: str = 'SAME') -> jax.Array:
    """NHWC convolution as im2col + one matmul.

    1x1 kernels are a plain matmul (after striding). kxk kernels concatenate the
    k*k shifted views on the channel axis, in the (kh, kw, cin) order of the
    kernel, and contract once with kernel.reshape(kh*kw*cin, cout); the backward
    pass is then two matmuls plus the pad/slice transposes.
    """
    kh, kw, cin, cout = kernel.shape
    patches = _im2col(x, (kh, kw), _pair(strides), padding)
    if kh == kw == 1 and jax.default_backend() == 'cpu':
        return _pointwise_matmul(patches, kernel.reshape(cin, cout))
    return lax.dot_general(patches, kernel.reshape(kh * kw * cin, cout),
                           (((3,), (0,)), ((), ())))


def _im2col(x: jax.Array, window, strides, padding: str) -> jax.Array:
    """The kh*kw shifted (strided) views of padded x concatenated on the channel axis, in the
    (kh, kw, cin) order of a kernel; for 1x1 windows the one view, not copied."""
    pads = _pads(x.shape[1:3], window, strides, padding)
    if any(p != (0, 0) for p in pads):
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    out_hw = _out_hw(x.shape[1:3], window, strides)
    if tuple(window) == (1, 1):
        return x if tuple(strides) == (1, 1) else next(_shifted_slices(x, window, strides, out_hw))
    return jnp.concatenate(list(_shifted_slices(x, window, strides, out_hw)), axis=-1)


def _kernel_grad_gt(x: jax.Array, g: jax.Array) -> jax.Array:
    """x^T @ g over all leading axes (a matmul's kernel gradient), computed as (g^T @ x)^T.

    Autodiff's x^T @ g made XLA:CPU write g (or the fusion producing it, a BatchNorm
    backward) a second time, transposed, for its matmul; g^T @ x reads g as the
    input-gradient matmul does, so g is written once. The barrier keeps XLA from folding
    the final transpose back into the dot."""
    rows = lambda a: a.reshape(-1, a.shape[-1])
    return _fusion_barrier(lax.dot_general(rows(g), rows(x), (((0,), (0,)), ((), ())))).T


@jax.custom_vjp
def _pointwise_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w over x's last axis (a 1x1 convolution, or conv_toeplitz's banded matmul), its
    kernel gradient taken as g^T @ x (_kernel_grad_gt). Autodiff's x^T @ g had cost GoogLeNet
    0.6-1.3 ms per 1x1 layer at batch 128 in g's transposed copy, and g^T @ x's matmul ran
    faster too (16x64 from 32768 rows: 1.5 against 2.4-2.9 ms).
    """
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _pointwise_matmul_fwd(x, w):
    return _pointwise_matmul(x, w), (x, w)


def _pointwise_matmul_bwd(residuals, g):
    x, w = residuals
    dx = lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))
    return dx, _kernel_grad_gt(x, g)


_pointwise_matmul.defvjp(_pointwise_matmul_fwd, _pointwise_matmul_bwd)


def conv_shifted_sum(x: jax.Array, kernel: jax.Array, strides=(1, 1), padding: str = 'SAME') -> jax.Array:
    """Alternative gemm formulation: sum over the k*k shifted views of one matmul each
    (no im2col buffer). Kept for benchmarking: measured 1.5-2x slower than conv_gemm on CPU."""
    kh, kw, cin, cout = kernel.shape
    window, strides = (kh, kw), _pair(strides)
    pads = _pads(x.shape[1:3], window, strides, padding)
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    out_hw = _out_hw(x.shape[1:3], window, strides)
    views = _shifted_slices(x, window, strides, out_hw)
    taps = kernel.reshape(kh * kw, cin, cout)
    out = None
    for t, view in enumerate(views):
        y = lax.dot_general(view, taps[t], (((3,), (0,)), ((), ())))
        out = y if out is None else out + y
    return out


def toeplitz_block(out_width: int, features: int) -> int:
    """Output columns per banded matmul in conv_toeplitz (measured on XLA:CPU, layers with
    3-6 input channels): about 4 for narrow outputs (LeNet-5's 6 and 16 features), 2 for 64-96,
    where wider blocks waste more multiplies on the band's zeros. A divisor of the output width
    near that is preferred: padding the width to whole blocks costs a slice of the output."""
    target = 4 if features < 32 else 2
    if out_width <= target:
        return out_width
    divisors = [d for d in range(2, 2 * target + 1) if out_width % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), d)) if divisors else target


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _row_patches(rows: jax.Array, kh: int, out_h: int, blocks: int, stride: int, width: int) -> jax.Array:
    """(n, h, w * cin) -> (n, out_h, blocks, kh, width): patch [:, r, b, i] is
    rows[:, r + i, b * stride:b * stride + width]."""
    return jnp.stack([jnp.stack([rows[:, i:i + out_h, b * stride:b * stride + width] for i in range(kh)], axis=2)
                      for b in range(blocks)], axis=2)


def _row_patches_fwd(rows, kh, out_h, blocks, stride, width):
    return _row_patches(rows, kh, out_h, blocks, stride, width), rows.shape


def _row_patches_bwd(kh, out_h, blocks, stride, width, shape, g):
    # Each patch added in place into its window; autodiff's transpose (a zero-padded copy
    # of every patch, then one sum) ran as kh * blocks separate pad fusions in LeNet-5.
    dx = jnp.zeros(shape, g.dtype)
    for b in range(blocks):
        for i in range(kh):
            start = (0, i, b * stride)
            window = lax.dynamic_slice(dx, start, (shape[0], out_h, width))
            dx = lax.dynamic_update_slice(dx, window + g[:, :, b, i], start)
    return (dx,)


_row_patches.defvjp(_row_patches_fwd, _row_patches_bwd)


def conv_toeplitz(x: jax.Array, kernel: jax.Array, strides=(1, 1), padding: str = 'SAME',
                  block: int | None = None) -> jax.Array:
    """Stride-1 NHWC convolution as one banded (block-Toeplitz) matmul.

    Each output row of ``block`` columns is a matmul of the kh input rows under it,
    ``block + kw - 1`` columns each, with a banded matrix built from the kernel: per
    output pixel the patches hold kh*(block+kw-1)*cin/block values instead of im2col's
    kh*kw*cin, and the matmul's output is block*cout wide instead of cout. On inputs of
    a few channels (first layers, LeNet-5) im2col's patches are a large, memory-bound
    matmul operand with a narrow output; this form moves ~2-3x less and ran 2-3x faster
    there (fwd + backward), for (block + kw - 1) / kw times the multiplies.
    """
    kh, kw, cin, cout = kernel.shape
    if _pair(strides) != (1, 1):
        raise ValueError('conv_toeplitz takes stride 1 only')
    pads = _pads(x.shape[1:3], (kh, kw), (1, 1), padding)
    n, h, w, _ = x.shape
    out_h, out_w = _out_hw([size + lo + hi for size, (lo, hi) in zip((h, w), pads)], (kh, kw), (1, 1))
    block = block or toeplitz_block(out_w, cout)
    blocks = -(-out_w // block)
    span = block + kw - 1  # input columns under one block of outputs
    right = blocks * block + kw - 1 - w - pads[1][0]
    x = jnp.pad(x, ((0, 0), pads[0], (pads[1][0], right), (0, 0)))
    # Sliced from the (n, h, w * cin) view, the patches' minor dimension is span * cin, not
    # cin (3 or 6), and XLA:CPU builds them 1.4-1.5x faster (LeNet-5's first layer, batch 128).
    rows = x.reshape(n, x.shape[1], -1)
    patches = _row_patches(rows, kh, out_h, blocks, block * cin, span * cin)  # (n, out_h, blocks, kh, span * cin)
    band = np.zeros((kw, span, block), np.float32)  # band[j, a, x] = 1 where input column a = x + j
    for j in range(kw):
        band[j, np.arange(block) + j, np.arange(block)] = 1
    matrix = jnp.einsum('ijco,jax->iacxo', kernel, band.astype(kernel.dtype))
    # kernel gradient as g^T @ patches (_pointwise_matmul): LeNet-5 in one process, alternating
    # rounds against autodiff's patches^T @ g: 1.03-1.06x at batch 32 (5-9 of 9-11 rounds faster),
    # 1.01-1.08x at 128; the stems of GoogLeNet, ResNet-18 and AlexNet level (0.96-1.01x)
    y = _pointwise_matmul(patches.reshape(n * out_h * blocks, kh * span * cin),
                          matrix.reshape(kh * span * cin, block * cout))
    return y.reshape(n, out_h, blocks * block, cout)[:, :, :out_w]


def conv_xla(x: jax.Array, kernel: jax.Array, strides=(1, 1), padding: str = 'SAME') -> jax.Array:
    """The native XLA convolution (what nn.Conv does)."""
    pads = _pads(x.shape[1:3], kernel.shape[:2], _pair(strides), padding)
    return lax.conv_general_dilated(x, kernel, _pair(strides), pads,
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


# Largest batch slice one native convolution sees in the 'hybrid' impl: XLA:CPU's
# convolutions (and especially their kernel gradients) slow down superlinearly
# above ~32 images (batch 128 in one call: 2-3x slower per image than 4 calls of 32).
HYBRID_CONV_CHUNK = 32
# ... and at most this many bytes of input: on the AVX2 EPYC machine, in lax.scan, ResNet-18's
# 32x32x64 convolutions (256 KiB an image) ran 1.5x faster forward and input-gradient on slices
# of 8 images than of 32 (batch 32: 49 -> 30 ms, input gradient 46 -> 31), 16x16x128 ones
# 1.15x faster on 16; maps of 8x8x256 and smaller, and AlexNet's 14x14x96, were flat.
HYBRID_SLICE_BYTES = 2 * 2 ** 20
# The hybrid impl's native kernel-gradient convolution (GoogLeNet's 5x5s: images become
# the input features) runs fastest on slices of 16 images: 5x5 16x16x16 at batch 128, 1.9 ms per
# kernel gradient against 3.5-4.2 ms on slices of 32 and 28 ms in one call.
HYBRID_KERNEL_GRAD_CHUNK = 16
# Convolutions of at most this many input channels go through matmuls in the 'hybrid'
# impl: XLA:CPU's native convolution is inefficient with so few (LeNet-5 at batch 32:
# ~9,000 img/s as im2col matmuls instead of ~5,000; banded matmuls, conv_toeplitz:
# 20,000-24,000 on a faster machine where im2col gave 12,000-13,000). Wider layers
# lose: GoogLeNet's 16-channel 3x3s were ~30% slower as im2col matmuls and no faster
# as banded ones.
HYBRID_GEMM_MAX_CHANNELS = 8
# Output maps of at most this many pixels go through one im2col/matmul (conv_gemm) in the 'hybrid'
# impl: on a 4x4 map most of a 3x3 window is padding edge. On the 2-core AVX-512 Xeon, forward and
# both gradients in lax.scan: 4x4x512 b32 1.66x faster than native convs, b128 1.17x than Winograd;
# whole networks in one process, alternating (scan chunks, median paired ratio, rounds faster):
# VGG16 b32 1.095x (7/9), b128 1.023x (5/7); ResNet-18 b32 1.035x (6/9), b128 1.055x (5/7).
# AlexNet's 5x5 maps (25 pixels) lose at batch 128 (0.92x, 2/7; their Winograd path) and are level
# at 32 (0.98x, 1.00x), so they stay out.
# Since the Winograd kernel transforms became slice sums (6c4dcca), such maps go through Winograd
# tiles where winograd_conv_applies (4x4 maps from batch 32 at 64+ channels): whole networks in one
# process, alternating rounds against im2col: VGG16 b128 1.14x (7 of 7 faster), ResNet-18 b128
# 1.10x (6 of 7); since WINOGRAD_MIN_PIXELS is 512, at batch 32 too.
HYBRID_GEMM_MAX_MAP_PIXELS = 16
_CANONICAL = ('NHWC', 'HWIO', 'NHWC')


def _canonical_conv(lhs, rhs, strides, padding, lhs_dilation=None, rhs_dilation=None):
    """An NHWC/HWIO ``lax.conv_general_dilated`` whose vmap is written out for XLA:CPU.

    Vmapped over sweep members (batched inputs and kernels), jax's own rule
    makes one grouped convolution, which XLA:CPU runs about 2x slower than the
    members' convolutions one by one; this rule runs one per member. Batched
    inputs with a shared kernel fold into the image axis, a batched kernel with
    shared inputs into the output channels.
    """
    conv = functools.partial(lax.conv_general_dilated, window_strides=strides, padding=padding,
                             lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                             dimension_numbers=_CANONICAL)
    member_conv = custom_batching.custom_vmap(conv)

    @member_conv.def_vmap
    def _(size, batched, x, k):
        x_batched, k_batched = batched
        if x_batched and k_batched:
            return jnp.stack([member_conv(x[i], k[i]) for i in range(size)]), True
        if x_batched:
            out = member_conv(x.reshape(-1, *x.shape[2:]), k)
            return out.reshape(size, -1, *out.shape[1:]), True
        kh, kw, cin, cout = k.shape[1:]
        out = member_conv(x, jnp.moveaxis(k, 0, 3).reshape(kh, kw, cin, size * cout))
        return jnp.moveaxis(out.reshape(*out.shape[:3], size, cout), 3, 0), True

    return member_conv(lhs, rhs)


def native_conv_is_slow(in_hw, out_hw, kernel_hw) -> bool:
    """XLA:CPU's native convolution falls off its fast path when a map is smaller than the
    kernel: the input (VGG's 3x3 convs on 2x2 maps: ~1000x slower than a matmul) or the
    output, which the input-gradient convolution of a strided conv runs on."""
    return any(i < k or o < k for i, o, k in zip(in_hw, out_hw, kernel_hw))


def _conv_input_grad(g, kernel, in_shape, strides, padding):
    """d(conv)/dx as a canonical NHWC/HWIO convolution of the output gradient with the
    flipped, in/out-swapped kernel (strides become input dilation)."""
    kh, kw = kernel.shape[:2]
    pads = _pads(in_shape[1:3], (kh, kw), strides, padding)
    grad_pads = []
    for n, k, s, (lo, _), o in zip(in_shape[1:3], (kh, kw), strides, pads, g.shape[1:3]):
        before = k - lo - 1
        grad_pads.append((before, n + k - 1 - ((o - 1) * s + 1) - before))
    return _canonical_conv(g, _input_grad_kernel(kernel), (1, 1), grad_pads, lhs_dilation=strides)


def _input_grad_kernel(kernel):
    """The kernel whose convolution with the output gradient gives d(conv)/dx: flipped, in/out swapped."""
    return jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)


def _conv_kernel_grad(x, g, kernel_hw, strides, padding):
    """d(conv)/dkernel as a canonical convolution: channels of x act as the batch, images as
    input features, and the output gradient as a (Ho, Wo, B, O) kernel dilated by the strides."""
    kh, kw = kernel_hw
    pads = _pads(x.shape[1:3], (kh, kw), strides, padding)
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    out = _canonical_conv(xp.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (1, 1), 'VALID',
                          rhs_dilation=strides)
    return out[:, :kh, :kw].transpose(1, 2, 0, 3)


# Winograd F(2x2, 3x3) (Lavin & Gray, 2016): a 2x2 output tile of a 3x3 convolution is
# AT [(G k G^T) * (BT d B)] A for the 4x4 input tile d around it, 16 products instead of 36.
WINOGRAD_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
WINOGRAD_G = ((1, 0, 0), (.5, .5, .5), (.5, -.5, .5), (0, 0, 1))
WINOGRAD_AT = ((1, 1, 1, 0), (0, 1, -1, -1))
# Smallest map on which the 'hybrid' impl takes a 3x3 stride-1 convolution's kernel
# gradient through Winograd tiles; smaller maps keep the native kernel-gradient conv.
# 4 on the AVX-512 EPYC machine (training, scan mode, against 8: AlexNet's 5x5 maps
# b128 355 -> 390 img/s, VGG16 b128 148 -> 154, ResNet-18 and batch 32 unchanged);
# an older 2-core machine had measured 4x4 maps 6% slower at batch 32.
WINOGRAD_MIN_SIZE = 4
# Forward and input gradient through Winograd tiles (one matmul per tile position, no stacks) on
# layers with at least this many input and output channels and output pixels per batch. In lax.scan on
# the AVX2 EPYC, forward (input gradient) against native convs: 16x16x128 b32 24 -> 17 ms (25 -> 17),
# 8x8x256 b128 108 -> 61 (108 -> 62), 4x4x512 b128 129 -> 76 (127 -> 85), b64 62 -> 50 (67 -> 62),
# AlexNet's 14x14x96 VALID b128 97-113 -> 71-90. Slower: 4x4x512 b32 (512 pixels) 33 -> 46;
# 5x5x384 b32 (800) 24 -> 31. The 32x32x64 layers of ResNet-18 and VGG16 (64 channels): forward
# b32 37-40 -> 33 ms (input gradient 35-39 -> 27-31), b128 96 -> 102 (98 -> 101), and whole
# ResNet-18 steps faster at both batches (alternating A/B, median img/s: b32 21.1 -> 25.8, b128 19.7 -> 24.2),
# VGG16 level or faster. Fewer channels lose: GoogLeNet's 16x16x16 and 8x8x32 b128 2.6-2.8 -> 3.7 ms.
# 512 pixels since the kernel transforms became slice sums (6c4dcca): the 4x4x512 layers at batch 32
# through Winograd tiles instead of im2col, whole networks in one process on the 2-core AVX-512 Xeon
# (alternating rounds, median paired ratio against 1,024): ResNet-18 b32 1.03x (5 of 7 faster) and
# 1.04x (7 of 7), VGG16 b32 1.08x (6 of 7); VGG16 b128, whose 2x2x512 maps it also takes, 1.02x (4 of 7).
WINOGRAD_MIN_CHANNELS = 64
WINOGRAD_MIN_PIXELS = 512
# ... and where at least this fraction of the 2x2 tiles' outputs are real: an odd 5x5 output takes
# 3x3 tiles (6x6, 31% of them padding). AlexNet's 5x5x256-384 maps on the 2-core AVX-512 Xeon, whole
# network in one process, alternating rounds: native forward and input gradient 1.10x and 1.09x faster
# at batch 128 (7 of 7, 8 of 9 rounds; 3,200 pixels a batch, so Winograd had applied there); at 32
# (native already) Winograd measured 0.68x.
WINOGRAD_MIN_TILE_USE = 0.75


def _lincomb(coeffs, terms):
    """sum(c * t) with the zero and +-1 coefficients written as skips and adds."""
    out = None
    for c, t in zip(coeffs, terms):
        if c == 0:
            continue
        term = t if c == 1 else -t if c == -1 else c * t
        out = term if out is None else out + term
    return out


def _winograd_shape(kernel_hw, strides, padding: str) -> bool:
    """Whether F(2x2, 3x3) computes this convolution: 3x3 kernel, stride 1, SAME or VALID padding."""
    return tuple(kernel_hw) == (3, 3) and tuple(strides) == (1, 1) and padding in ('SAME', 'VALID')


def _winograd_out_hw(h: int, w: int, padding: str) -> tuple[int, int]:
    return (h, w) if padding == 'SAME' else (h - 2, w - 2)


def _winograd_grid(h: int, w: int, padding: str = 'SAME') -> tuple[int, int]:
    """Rows and columns of 2x2 output tiles that cover the output of a 3x3 stride-1 conv of an h x w map.
    VALID gets its own grid, not SAME's cropped: AlexNet's 14x14 input has 6x6 tiles, not 7x7."""
    return _tile_grid(*_winograd_out_hw(h, w, padding), 2)


def _tile_grid(h: int, w: int, tile: int) -> tuple[int, int]:
    """Rows and columns of tile x tile output tiles that cover an h x w output."""
    return -(-h // tile), -(-w // tile)


def _winograd_tile_list(x: jax.Array, padding: str = 'SAME') -> list[jax.Array]:
    """(n, h, w, c) -> 16 arrays (n*th*tw, c): BT d B for every 4x4 tile d of the padded
    input, tiles at stride 2 (one per 2x2 output tile). The transform is separable: rows, then columns."""
    n, h, w, c = x.shape
    th, tw = _winograd_grid(h, w, padding)
    lo = 1 if padding == 'SAME' else 0
    xp = jnp.pad(x, ((0, 0), (lo, 2 * th + 2 - h - lo), (lo, 2 * tw + 2 - w - lo), (0, 0)))
    blocks = xp.reshape(n, th + 1, 2, tw + 1, 2, c)   # padded row 2a+b is blocks[:, a, b]
    rows = [blocks[:, i // 2:i // 2 + th, i % 2] for i in range(4)]  # tile row i: (n, th, tw+1, 2, c)
    tiles = []
    for r in range(4):
        row = _lincomb(WINOGRAD_BT[r], rows)
        cols = [row[:, :, j // 2:j // 2 + tw, j % 2] for j in range(4)]  # (n, th, tw, c)
        tiles += [_lincomb(WINOGRAD_BT[s], cols).reshape(n * th * tw, c) for s in range(4)]
    return tiles


def _winograd_kernel_tiles(kernel: jax.Array) -> list[jax.Array]:
    """(3, 3, c, k) -> 16 arrays (c, k): G k G^T, as sums of kernel slices (rows, then columns).
    XLA:CPU ran the same einsum as two matmuls of inner size 3 at a few GB/s: 137 of ResNet-18's
    1,347 ms a step at batch 32 (profiled; 60 transforms). With these sums (and _winograd_input_grad),
    whole networks in one process, alternating rounds on the 2-core AVX-512 Xeon: ResNet-18 b32
    1.14x (6 of 7 rounds faster), VGG16 b32 1.07x (7/7), b128 1.03x (6/7); ResNet-18 b128 and
    AlexNet b128 level (1.00x, 0.99x).
    A list, not a stack: each tile goes straight to its matmul, and the input gradient's
    permutation of them is a reordering of the list instead of a gather (_winograd_input_grad)."""
    rows = [_lincomb(WINOGRAD_G[r], [kernel[i] for i in range(3)]) for r in range(4)]  # (3, c, k)
    return [_lincomb(WINOGRAD_G[s], [row[j] for j in range(3)]) for row in rows for s in range(4)]


def _winograd_untile_kernel(tiles: Sequence[jax.Array]) -> jax.Array:
    """16 tiles (c, k) (a list or a stack) -> (3, 3, c, k): G^T d G, the transpose of
    _winograd_kernel_tiles."""
    gt = np.asarray(WINOGRAD_G).T
    rows = [[_lincomb(gt[i], [tiles[4 * r + s] for r in range(4)]) for s in range(4)] for i in range(3)]
    return jnp.stack([jnp.stack([_lincomb(gt[j], row) for j in range(3)]) for row in rows])


def conv_winograd(x: jax.Array, kernel: jax.Array, strides=(1, 1), padding: str = 'SAME') -> jax.Array:
    """3x3, stride-1, SAME or VALID NHWC convolution by Winograd F(2x2, 3x3): one (P x c) @ (c x k)
    matmul per tile position over all P tiles, plus add-only transforms. The 'hybrid' impl's
    forward and input gradient on wide layers (winograd_conv_applies); reference for its kernel gradient.
    Computed in float32: in bfloat16 the tile transforms' roundings made it ~3.5x less accurate
    than XLA's bfloat16 convolution."""
    padding = padding.upper()
    if not _winograd_shape(kernel.shape[:2], _pair(strides), padding):
        raise ValueError('conv_winograd takes 3x3 kernels, stride 1, SAME or VALID padding only')
    return _conv_winograd_tiled(x, _winograd_kernel_tiles(kernel.astype(jnp.float32)), padding)


# Tile (r, s) of the flipped kernel is tile (P r, P s) of the kernel: G J = P G for the flip J.
_WINOGRAD_FLIP = (3, 1, 2, 0)
_WINOGRAD_FLIPPED_TILES = tuple(4 * _WINOGRAD_FLIP[r] + _WINOGRAD_FLIP[s] for r in range(4) for s in range(4))


def _winograd_input_grad(g: jax.Array, kernel: jax.Array) -> jax.Array:
    """d(conv)/dx of a 3x3 stride-1 SAME convolution by Winograd tiles: conv_winograd of g with the
    flipped, in/out-swapped kernel, its tiles taken from the kernel's own (permuted; each matmul
    contracts the tile's output-channel axis). Transforming the flipped, transposed kernel instead
    read it in a cache-hostile order: ~2 ms per tile on ResNet-18's 256-channel layers.
    Permuted as a list: a gather on the stacked tiles had cost 4-6 ms per 512-channel layer in
    a ResNet-18 step at batch 32, and stacking them (and the kernel gradient's tiles) as much
    again. Whole networks in one process, alternating rounds against the stacks: ResNet-18 b32
    1.11x (7 of 9 rounds faster), VGG16 b32 1.08x (7/9), AlexNet b32 1.04x (6/9); at b128 level
    (ResNet-18 0.97x and 1.04x in two runs, VGG16 0.99x, AlexNet 1.01x; GoogLeNet, whose 3x3s
    take only the kernel gradient this way, 0.95x at b128 and 1.00x at b32, medians 488 / 480 and
    544 / 531 img/s)."""
    tiles = _winograd_kernel_tiles(kernel.astype(jnp.float32))
    return _conv_winograd_tiled(g, [tiles[i] for i in _WINOGRAD_FLIPPED_TILES], 'SAME', tiles_transposed=True)


def _conv_winograd_tiled(x: jax.Array, kernel_tiles: Sequence[jax.Array], padding: str,
                         tiles_transposed: bool = False) -> jax.Array:
    """conv_winograd on the kernel's 16 tiles (c, k), or (k, c) if ``tiles_transposed``."""
    out_dtype = x.dtype
    x = x.astype(jnp.float32)
    n, h, w, _ = x.shape
    th, tw = _winograd_grid(h, w, padding)
    contract = (((1,), (1 if tiles_transposed else 0,)), ((), ()))
    products = [lax.dot_general(t, kernel_tiles[i], contract).reshape(n, th, tw, -1)
                for i, t in enumerate(_winograd_tile_list(x, padding))]
    half = [[_lincomb(WINOGRAD_AT[s], products[4 * r:4 * r + 4]) for s in range(2)] for r in range(4)]
    y = jnp.stack([jnp.stack([_lincomb(WINOGRAD_AT[r], [half[i][s] for i in range(4)]) for s in range(2)])
                   for r in range(2)])  # (2, 2, n, th, tw, k)
    oh, ow = _winograd_out_hw(h, w, padding)
    return y.transpose(2, 3, 0, 4, 1, 5).reshape(n, 2 * th, 2 * tw, -1)[:, :oh, :ow].astype(out_dtype)


def _winograd_kernel_grad(x: jax.Array, g: jax.Array, padding: str = 'SAME') -> jax.Array:
    """d(conv)/dkernel of a 3x3 stride-1 SAME or VALID convolution, transposing conv_winograd by hand:
    output-gradient tiles through A, one (c x P) @ (P x k) matmul per tile position, then G.
    About 2.25x fewer multiplies than the direct kernel gradient, and plain matmuls.
    Computed in float32: bfloat16 sums over the tiles lose ~3x more than the direct form."""
    x, g = x.astype(jnp.float32), g.astype(jnp.float32)
    n, h, w, _ = x.shape
    th, tw = _winograd_grid(h, w, padding)
    oh, ow = g.shape[1:3]
    gp = jnp.pad(g, ((0, 0), (0, 2 * th - oh), (0, 2 * tw - ow), (0, 0)))
    g_tiles = gp.reshape(n, th, 2, tw, 2, -1)  # output tile (r, s) is g_tiles[:, :, r, :, s]
    at = np.asarray(WINOGRAD_AT).T  # at[a] = coefficients of the 2 outputs that product row a feeds
    rows = [_lincomb(at[a], [g_tiles[:, :, r] for r in range(2)]) for a in range(4)]  # (n, th, tw, 2, k)
    d_products = [_lincomb(at[b], [rows[a][..., s, :] for s in range(2)]).reshape(n * th * tw, -1)
                  for a in range(4) for b in range(4)]
    # One (c x P) @ (P x k) matmul per tile position, each on its own transform's output:
    # stacking the 16 transforms for one batched matmul copies both (128 MiB each on ResNet-18's
    # 32x32x64 layers at batch 128) and measured 1.2x slower there, 1.3x on its 16x16x128 ones.
    d_kernel_tiles = [lax.dot_general(t, d, (((0,), (0,)), ((), ())))
                      for t, d in zip(_winograd_tile_list(x, padding), d_products)]  # 16 x (c, k)
    return _winograd_untile_kernel(d_kernel_tiles)


def winograd_conv_applies(x_shape, kernel_shape, strides, padding: str) -> bool:
    """Whether the 'hybrid' conv runs this layer's forward and input gradient through Winograd tiles:
    3x3, stride 1, SAME or VALID, at least WINOGRAD_MIN_CHANNELS in and out (with fewer, the memory-bound
    transforms outweigh the 2.25x fewer multiplies) and WINOGRAD_MIN_PIXELS output pixels a batch
    (fewer make matmuls too small to run fast), and at least WINOGRAD_MIN_TILE_USE of the tiles' outputs real."""
    if not _winograd_shape(kernel_shape[:2], strides, padding):
        return False
    n, h, w, cin = x_shape
    oh, ow = _winograd_out_hw(h, w, padding)
    th, tw = _tile_grid(oh, ow, 2)
    return (min(cin, kernel_shape[3]) >= WINOGRAD_MIN_CHANNELS and n * oh * ow >= WINOGRAD_MIN_PIXELS
            and oh * ow >= WINOGRAD_MIN_TILE_USE * 4 * th * tw)


def _slice_images(x: jax.Array) -> int:
    """Images per native-convolution slice of x: HYBRID_CONV_CHUNK, fewer for large maps."""
    image_bytes = int(np.prod(x.shape[1:])) * x.dtype.itemsize
    return max(1, min(HYBRID_CONV_CHUNK, HYBRID_SLICE_BYTES // image_bytes))


def _batch_slices(n: int, chunk: int):
    return [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]


def _on_batch_slices(fn, x, chunk: int, *sliced):
    """fn on slices of at most ``chunk`` images of x (and of each of ``sliced``), concatenated."""
    return jnp.concatenate([fn(x[b], *(a[b] for a in sliced)) for b in _batch_slices(x.shape[0], chunk)],
                           axis=0)


# With 16 channels the kernel gradient's tile transforms, elementwise passes over rows of 16 floats
# (which XLA:CPU runs 2-3x slower per element than long rows), cost more than the multiplies they
# save: forward and both gradients in lax.scan, native kernel gradient against Winograd (AVX2 EPYC,
# 2026-12-04): 16x16x16 at batch 128 0.83x the time, 32x32x16 0.74x, at batch 32 0.95x / 0.92x;
# 8x8x32 level at 128 (0.99x), Winograd's 1.17x faster at 32. GoogLeNet (its two 16x16x16 3x3s), in
# one process (tools/ab_bench.py, median paired ratio, rounds faster): batch 128 1.014x (7 of 11) and
# 1.05x (7 of 11), batch 32 1.043x (6 of 11).
WINOGRAD_KERNEL_GRAD_MIN_CHANNELS = 32


def winograd_kernel_grad_applies(in_hw, kernel_shape, strides, padding: str) -> bool:
    """Whether the 'hybrid' conv takes this layer's kernel gradient through Winograd tiles:
    3x3, stride 1, SAME or VALID, on maps of at least WINOGRAD_MIN_SIZE, at least
    WINOGRAD_KERNEL_GRAD_MIN_CHANNELS in and out."""
    return (_winograd_shape(kernel_shape[:2], strides, padding) and min(in_hw) >= WINOGRAD_MIN_SIZE
            and min(kernel_shape[2:]) >= WINOGRAD_KERNEL_GRAD_MIN_CHANNELS)


# Winograd F(4x4, 5x5) for 'same' 5x5 convolutions of WINOGRAD_TILES_MIN_CHANNELS or more (GoogLeNet's
# 8x8x32 ones): an 8x8 input tile gives 4x4 outputs from 64 products per channel pair instead of 400.
# Its transforms have fractional coefficients, so they run as small matmuls over a leading tile axis
# rather than F(2x2, 3x3)'s adds; errors ~1e-5 of an output's scale instead of ~1e-7. Forward and both
# gradients in lax.scan against the native path (AVX2 EPYC): 8x8x32 at batch 128 12.7 -> 10.5 ms,
# at 32 4.7 -> 3.3; GoogLeNet's 16x16x16 ones slower (b128 16.6 -> 20.4 ms, b32 3.6 -> 3.7: the
# transforms' copies outweigh the 6.25x fewer products with 16 channels). Its 3x3s as F(4x4, 3x3)
# measured no faster (jit, forward plus gradients at batch 128: 8x8x32 4.9 -> 4.6 ms, 16x16x16
# 5.4 -> 5.5; slower at batch 32).
WINOGRAD_LARGE_TILE = 4
WINOGRAD_LARGE_KERNELS = (5,)
WINOGRAD_TILES_MIN_CHANNELS = 32
# Cook-Toom interpolation points, infinity implied as the last one: small and exact in binary.
WINOGRAD_POINTS = (0, 1, -1, 2, -2, 0.5, -0.5)


@functools.lru_cache
def winograd_matrices(tile: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A^T (tile, a), G (a, size), B^T (a, a) of Winograd F(tile, size), a = tile + size - 1:
    y = A^T [(G g) * (B^T d)] is the correlation of an a-long input d with a size-long filter g.
    A^T and G follow Cook-Toom on WINOGRAD_POINTS; B^T is the unique solution of that identity,
    checked to hold exactly."""
    a = tile + size - 1
    points = np.asarray(WINOGRAD_POINTS[:a - 1], np.float64)
    at, g = np.zeros((tile, a)), np.zeros((a, size))
    at[:, :a - 1] = points[None] ** np.arange(tile)[:, None]
    at[tile - 1, a - 1] = 1
    for j, p in enumerate(points):
        g[j] = p ** np.arange(size) / np.prod([p - q for q in np.delete(points, j)])
    g[a - 1, size - 1] = 1
    # sum_j at[i, j] g[j, k] bt[j, l] = [l == i + k] for every output i and tap k
    system = np.einsum('ij,jk->ikj', at, g).reshape(tile * size, a)
    target = np.stack([np.eye(a)[i + k] for i in range(tile) for k in range(size)])
    bt = np.linalg.lstsq(system, target, rcond=None)[0]
    if not np.allclose(system @ bt, target, atol=1e-9):
        raise ValueError(f'no Winograd F({tile}, {size}) on the points {points.tolist()}')
    return tuple(m.astype(np.float32) for m in (at, g, bt))


def winograd_tiles_apply(x_shape, kernel_shape, strides, padding: str) -> bool:
    """Whether the 'hybrid' conv runs this layer through conv_winograd_tiles: a square kernel of
    WINOGRAD_LARGE_KERNELS, stride 1, SAME, at least WINOGRAD_TILES_MIN_CHANNELS input channels."""
    kh, kw = kernel_shape[:2]
    return (kh == kw and kh in WINOGRAD_LARGE_KERNELS and tuple(strides) == (1, 1)
            and padding.upper() == 'SAME' and x_shape[-1] >= WINOGRAD_TILES_MIN_CHANNELS)


def _transform_tiles(x: jax.Array, matrix: np.ndarray, tile: int, grid: tuple[int, int]) -> jax.Array:
    """(n, H, W, c) -> (m*m, n*th*tw, c): M d M^T for every L x L tile d of x at stride ``tile``
    (M is m x L; grid = (th, tw) tiles), indexed (column, row) of the transform. Each step stacks
    strided row or column views on a leading axis and applies M over it: a matmul on the leading
    axis (as one einsum, XLA:CPU transposed the result in a slow copy of its own)."""
    m, length = matrix.shape
    th, tw = grid
    n, c = x.shape[0], x.shape[-1]
    views = jnp.stack([x[:, i:i + tile * th:tile] for i in range(length)])  # (L_i, n, th, W, c)
    rows = jnp.tensordot(matrix, views, 1)  # (m_i, n, th, W, c)
    cols = jnp.stack([rows[:, :, :, j:j + tile * tw:tile] for j in range(length)])  # (L_j, m_i, n, th, tw, c)
    return jnp.tensordot(matrix, cols, 1).reshape(m * m, n * th * tw, c)


def _winograd_input_tiles(x: jax.Array, tile: int, size: int) -> jax.Array:
    """(n, h, w, c) -> (a*a, n*th*tw, c): B^T d B for every a x a tile d of the SAME-padded input,
    tiles at stride ``tile``, indexed (column, row) of the transform."""
    _, _, bt = winograd_matrices(tile, size)
    _, h, w, _ = x.shape
    th, tw = _tile_grid(h, w, tile)
    lo = (size - 1) // 2
    xp = jnp.pad(x, ((0, 0), (lo, th * tile + size - 1 - h - lo), (lo, tw * tile + size - 1 - w - lo), (0, 0)))
    return _transform_tiles(xp, bt, tile, (th, tw))


def _winograd_tile_products(tiles: jax.Array, kernel: jax.Array, tile: int) -> jax.Array:
    """One (P x c) @ (c x k) matmul per tile position with G k G^T, in the (column, row) order of the tiles."""
    size = kernel.shape[0]
    _, g, _ = winograd_matrices(tile, size)
    kernel_tiles = jnp.einsum('ir,rsck,js->jick', g, kernel, g).reshape(-1, *kernel.shape[2:])
    return lax.dot_general(tiles, kernel_tiles, (((2,), (1,)), ((0,), (0,))))


def _winograd_output(products: jax.Array, tile: int, size: int, out_shape) -> jax.Array:
    """A^T m A for every tile of products (a*a, n*th*tw, k), assembled into (n, h, w, k)."""
    a = tile + size - 1
    at, _, _ = winograd_matrices(tile, size)
    n, h, w = out_shape
    th, tw = _tile_grid(h, w, tile)
    columns_done = jnp.tensordot(at, products.reshape(a, a, n, th, tw, -1), 1)  # (v, a_i, n, th, tw, k)
    y = jnp.einsum('ui,vintxk->ntuxvk', at, columns_done)
    return y.reshape(n, th * tile, tw * tile, -1)[:, :h, :w]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_winograd_tiles(x, kernel, tile):
    return _conv_winograd_tiles_fwd(x, kernel, tile)[0]


def _conv_winograd_tiles_fwd(x, kernel, tile):
    tiles = _winograd_input_tiles(x, tile, kernel.shape[0])
    y = _winograd_output(_winograd_tile_products(tiles, kernel, tile), tile, kernel.shape[0], x.shape[:3])
    return y, (tiles, kernel)


def _conv_winograd_tiles_bwd(tile, residuals, g):
    """Input gradient: the same convolution of g with the flipped, in/out-swapped kernel (SAME, odd
    size). Kernel gradient: the forward's input tiles (kept) against A-transformed output-gradient
    tiles, one (c x P) @ (P x k) matmul per tile position, then G^T . G. Autodiff's transposes of
    the tensordots (they contract non-leading axes) ran 1.1-1.5x slower in jit."""
    tiles, kernel = residuals
    size = kernel.shape[0]
    a = tile + size - 1
    at, gm, _ = winograd_matrices(tile, size)
    _, h, w, _ = g.shape
    th, tw = _tile_grid(h, w, tile)
    gp = jnp.pad(g, ((0, 0), (0, th * tile - h), (0, tw * tile - w), (0, 0)))
    d_products = _transform_tiles(gp, at.T, tile, (th, tw))  # A g A^T per output-gradient tile: (a*a, P, k)
    d_kernel_tiles = lax.dot_general(tiles, d_products, (((1,), (1,)), ((0,), (0,))))  # (a*a, c, k)
    dk = jnp.einsum('ir,js,jick->rsck', gm, gm, d_kernel_tiles.reshape(a, a, *d_kernel_tiles.shape[1:]))
    return _conv_winograd_tiles(g, _input_grad_kernel(kernel), tile), dk


_conv_winograd_tiles.defvjp(_conv_winograd_tiles_fwd, _conv_winograd_tiles_bwd)


def conv_winograd_tiles(x: jax.Array, kernel: jax.Array, strides=(1, 1), padding: str = 'SAME',
                        tile: int | None = None) -> jax.Array:
    """Stride-1 SAME NHWC convolution with an odd square kernel by Winograd F(tile x tile, k x k)
    (default WINOGRAD_LARGE_TILE, read at trace time like the other thresholds), with a custom VJP
    (see _conv_winograd_tiles_bwd). Computed in float32, as conv_winograd."""
    tile = tile or WINOGRAD_LARGE_TILE
    kh, kw = kernel.shape[:2]
    if kh != kw or kh % 2 == 0 or _pair(strides) != (1, 1) or padding.upper() != 'SAME':
        raise ValueError('conv_winograd_tiles takes odd square kernels, stride 1, SAME padding only')
    return _conv_winograd_tiles(x.astype(jnp.float32), kernel.astype(jnp.float32), tile).astype(x.dtype)


def _gemm_kernel_grad(x, g, kernel_shape, strides, padding):
    """im2col's kernel gradient as (g^T @ patches)^T, as _pointwise_matmul's: autodiff's
    patches^T @ g made XLA:CPU write g transposed in the fusion producing it (the next
    BatchNorm's backward: 8 ms for 32x16x16x128 in a ResNet-18 step at batch 32, 0.5 GB/s).
    ResNet-18's strided 3x3s, whole network in one process (alternating rounds, median
    paired ratio): 1.03x at batch 32 (6 of 7 rounds faster) and at 128 (5 of 7)."""
    return _kernel_grad_gt(_im2col(x, kernel_shape[:2], strides, padding), g).reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_canonical(x, kernel, strides, padding, chunk):
    if winograd_conv_applies(x.shape, kernel.shape, strides, padding):
        return conv_winograd(x, kernel, strides, padding)
    pads = _pads(x.shape[1:3], kernel.shape[:2], strides, padding)
    return _on_batch_slices(lambda part: _canonical_conv(part, kernel, strides, pads), x, chunk)


def _conv_canonical_fwd(x, kernel, strides, padding, chunk):
    return _conv_canonical(x, kernel, strides, padding, chunk), (x, kernel)


def _conv_canonical_bwd(strides, padding, chunk, residuals, g):
    x, kernel = residuals
    if winograd_conv_applies(x.shape, kernel.shape, strides, padding):
        # d(conv)/dx of a stride-1 3x3 conv: a SAME conv of g with _input_grad_kernel,
        # g padded by one more on each side for a VALID conv (its input is 2 larger than its output)
        edge = 0 if padding == 'SAME' else 1
        dx = _winograd_input_grad(jnp.pad(g, ((0, 0), (edge, edge), (edge, edge), (0, 0))), kernel)
    else:
        dx = _on_batch_slices(lambda gb, xb: _conv_input_grad(gb, kernel, xb.shape, strides, padding), g, chunk, x)
    if winograd_kernel_grad_applies(x.shape[1:3], kernel.shape, strides, padding):
        dk = _winograd_kernel_grad(x, g, padding)  # matmuls over all tiles: no need for batch slices
    elif strides != (1, 1):
        # im2col's kernel gradient: the native form transposes x to (C, H, W, N), and XLA fuses
        # x's producers (earlier layers' BatchNorm, adds, ReLU) into that transpose and recomputes
        # them in its cache-hostile order: 12% of a ResNet-18 step in one layer.
        dk = _gemm_kernel_grad(x, g, kernel.shape, strides, padding)
    else:
        dk = sum(_conv_kernel_grad(x[b], g[b], kernel.shape[:2], strides, padding)
                 for b in _batch_slices(x.shape[0], min(chunk, HYBRID_KERNEL_GRAD_CHUNK)))
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_conv_canonical.defvjp(_conv_canonical_fwd, _conv_canonical_bwd)


def conv_hybrid(x: jax.Array, kernel: jax.Array, strides=(1, 1), padding: str = 'SAME',
                chunk: int | None = None, onednn_threads: int = 0, onednn_pieces: int = 1,
                onednn_fold: int = 1) -> jax.Array:
    """The fastest measured form per layer on XLA:CPU, also inside lax.scan.

    Where oneDNN is installed, the layers onednn_applies picks (a kernel larger than 1x1, at
    least ONEDNN_MIN_PIXELS output pixels, and enough pixels a call where Winograd's tiles would
    take the layer) run its convolution (onednn.conv, on
    ``onednn_threads`` threads: 0 all, 1 one; its batch in ``onednn_pieces`` pieces that XLA's
    idle threads may take; its width folded into channels by ``onednn_fold`` where that fits,
    onednn.conv_folded); everything below is what runs without it, and for the rest.
    Inputs of at most HYBRID_GEMM_MAX_CHANNELS channels: stride 1, one banded matmul
    (conv_toeplitz); strided or 1x1, im2col/matmul on batch slices of at most ``chunk``
    images. 1x1 kernels, maps smaller than the kernel and output maps of at most
    HYBRID_GEMM_MAX_MAP_PIXELS (unless Winograd tiles apply): one im2col/matmul (conv_gemm).
    Everything else: native convolutions on batch slices of at most ``chunk``
    images (default: HYBRID_CONV_CHUNK, fewer where a slice's input would pass
    HYBRID_SLICE_BYTES), with a custom VJP whose input and kernel gradients are written as
    canonical NHWC/HWIO convolutions, except the kernel gradient of 3x3 stride-1
    SAME or VALID layers on maps of at least WINOGRAD_MIN_SIZE with at least
    WINOGRAD_KERNEL_GRAD_MIN_CHANNELS, which goes through Winograd F(2x2, 3x3) tiles
    (_winograd_kernel_grad): XLA:CPU's kernel-gradient convolution costs several times its
    forward there; strided layers take im2col's kernel gradient.
    Wide 3x3 stride-1 layers with enough output pixels (winograd_conv_applies: VGG16's and
    ResNet-18's 64- to 256-channel stages, AlexNet's 12x12-output 3x3) also run their
    forward and input gradient through Winograd tiles (conv_winograd).
    5x5 stride-1 SAME layers of WINOGRAD_TILES_MIN_CHANNELS or more run entirely through
    Winograd F(4x4, 5x5) tiles (conv_winograd_tiles: GoogLeNet's 8x8x32 5x5s).
    Why canonical: XLA:CPU only runs non-canonical
    convolutions (the ones jax's own conv transpose rules emit) fast through a
    rewrite that does not happen inside while loops, where they fall to a naive
    loop nest 30-200x slower; train.fit's lax.scan over steps is such a loop.
    """
    chunk = chunk or _slice_images(x)
    kh, kw = kernel.shape[:2]
    strides = _pair(strides)
    pads = _pads(x.shape[1:3], (kh, kw), strides, padding)
    padded_hw = [n + lo + hi for n, (lo, hi) in zip(x.shape[1:3], pads)]
    out_hw = _out_hw(padded_hw, (kh, kw), strides)
    if onednn_applies(x, kernel, out_hw, strides, padding):
        return onednn.conv_folded(x, kernel, strides, pads, onednn_threads, onednn_pieces, onednn_fold)
    if x.shape[-1] <= HYBRID_GEMM_MAX_CHANNELS:
        if strides == (1, 1) and (kh, kw) != (1, 1):
            return conv_toeplitz(x, kernel, strides, padding)
        # im2col patches stay in cache per slice
        return _on_batch_slices(lambda part: conv_gemm(part, kernel, strides, padding), x, chunk)
    small_map = (out_hw[0] * out_hw[1] <= HYBRID_GEMM_MAX_MAP_PIXELS
                 and not winograd_conv_applies(x.shape, kernel.shape, strides, padding.upper()))
    if (kh, kw) == (1, 1) or native_conv_is_slow(x.shape[1:3], out_hw, (kh, kw)) or small_map:
        return conv_gemm(x, kernel, strides, padding)
    if winograd_tiles_apply(x.shape, kernel.shape, strides, padding):
        return conv_winograd_tiles(x, kernel, strides, padding)
    return _conv_canonical(x, kernel, strides, padding.upper(), chunk)


def conv_onednn(x: jax.Array, kernel: jax.Array, strides=(1, 1), padding: str = 'SAME',
                onednn_threads: int = 0, onednn_pieces: int = 1, onednn_fold: int = 1) -> jax.Array:
    """oneDNN's direct convolution (float32 or bfloat16, CPU; models/onednn.py), forward and both gradients."""
    onednn.require()
    if x.dtype != kernel.dtype or x.dtype not in ONEDNN_DTYPES:
        raise ValueError('the oneDNN convolutions take float32 or bfloat16 activations and kernel of the '
                         f'same type, got {x.dtype} and {kernel.dtype}')
    if x.dtype == jnp.bfloat16 and not onednn.bfloat16_supported():
        raise onednn.OnednnUnavailable("oneDNN has no bfloat16 convolutions for this CPU (they need "
                                       "AVX-512); use conv='hybrid' or float32")
    strides = _pair(strides)
    pads = _pads(x.shape[1:3], kernel.shape[:2], strides, padding)
    return onednn.conv_folded(x, kernel, strides, pads, onednn_threads, onednn_pieces, onednn_fold)


# conv_hybrid hands a layer to oneDNN (when it is available: models/onednn.py) when its kernel is
# larger than 1x1 and its output map has at least ONEDNN_MIN_PIXELS pixels. Forward and both
# gradients of one layer at batch 128 (jit, median of 7, 2-core AVX-512 Xeon), oneDNN against the
# XLA forms below: 32x32x64 2.06x faster, 16x16x64->128 1.77x, 16x16x128 1.43x, stride-2
# 32x32x64->128 1.95x, GoogLeNet's 16x16x16 3x3 2.16x and 5x5 2.38x, AlexNet's 5x5x384 1.30x;
# 8x8x256 1.00x, 4x4x512 0.68x, 2x2x512 0.48x (Winograd wins there). 1x1 convs stay matmuls
# (ONEDNN_POINTWISE: GoogLeNet 1.00x at batch 128, 0.87x at 32; ResNet-18 0.99x at 32).
# Layers of at most HYBRID_GEMM_MAX_CHANNELS input channels (first layers, LeNet-5's) take it too,
# where the banded matmul below took them. In one process, oneDNN for them against the banded
# matmul: at batch 128 LeNet-5 1.04x and 1.13x, GoogLeNet's stem 1.07x, AlexNet 1.05x, ResNet-18
# 1.02x; at 32 (until 34111cd only from 65,536 output pixels a call, as LeNet-5's on both OpenMP
# threads ran 0.92x) GoogLeNet 1.06x, AlexNet 1.05x, VGG16 1.015x, ResNet-18 0.98x, and LeNet-5's
# two, on one thread a piece (lenet.py), 1.37x, at 128 1.23x against its second on the banded one.
# Layers whose forward Winograd's tiles take (winograd_conv_applies) go to oneDNN from
# ONEDNN_WINOGRAD_MIN_BATCH_PIXELS output pixels a call (batch 64 of 8x8 maps): 8x8x256 at batch
# 32 (2,048 pixels) ran 0.80x through oneDNN, at 128 1.00x. In one process at batch 32, those
# layers back on Winograd: ResNet-18 1.024x and 1.05x (5 of 7, 7 of 7 rounds), VGG16 1.052x and
# 1.05x (5 of 5 twice); AlexNet's 12x12 3x3 (4,608 pixels) on Winograd too, at 8,192: 0.977x.
# bfloat16 (ONEDNN_DTYPES: a bfloat16 network, or float32 multiplied in bfloat16, onednn.conv) takes
# the same layers. In one process at batch 128, every conv of a bfloat16 network through oneDNN
# (1x1s, 4x4 and 2x2 maps too): VGG16 0.95x (0 of 5 rounds faster), ResNet-18 0.92x (1 of 5);
# float32 in bfloat16 products with every 3x3 through it: VGG16 0.97x (0 of 5), ResNet-18 1.06x
# (4 of 5). But in bfloat16 oneDNN takes the layers Winograd's tiles would at any batch
# (ONEDNN_BFLOAT16_WINOGRAD_MIN_BATCH_PIXELS; the 8x8 maps at batch 32): in bfloat16 products at
# batch 32 VGG16 1.19x, ResNet-18 1.135x (7 of 7 rounds each).
ONEDNN_CONV = True
ONEDNN_MIN_PIXELS = 25
ONEDNN_WINOGRAD_MIN_BATCH_PIXELS = 4096
ONEDNN_BFLOAT16_WINOGRAD_MIN_BATCH_PIXELS = 0
ONEDNN_POINTWISE = False
ONEDNN_DTYPES = (jnp.float32, jnp.bfloat16)


def onednn_applies(x: jax.Array, kernel: jax.Array, out_hw, strides, padding: str) -> bool:
    pixels = out_hw[0] * out_hw[1]
    if not (ONEDNN_CONV and x.dtype == kernel.dtype and x.dtype in ONEDNN_DTYPES
            and (ONEDNN_POINTWISE or kernel.shape[:2] != (1, 1)) and pixels >= ONEDNN_MIN_PIXELS
            and onednn.available() and (x.dtype != jnp.bfloat16 or onednn.bfloat16_supported())):
        return False
    in_bfloat16 = x.dtype == jnp.bfloat16 or onednn.bfloat16_products(x.dtype)
    min_batch_pixels = ONEDNN_BFLOAT16_WINOGRAD_MIN_BATCH_PIXELS if in_bfloat16 else ONEDNN_WINOGRAD_MIN_BATCH_PIXELS
    return (x.shape[0] * pixels >= min_batch_pixels
            or not winograd_conv_applies(x.shape, kernel.shape, strides, padding.upper()))


def uses_onednn(impl: str) -> bool:
    """Whether convs of ``impl`` ('auto' resolved here) run oneDNN's convolutions where they apply."""
    impl = resolve_conv_impl(impl)
    return impl == 'onednn' or (impl == 'hybrid' and ONEDNN_CONV and onednn.available())


CONV_FUNCTIONS = {'xla': conv_xla, 'gemm': conv_gemm, 'hybrid': conv_hybrid, 'shifted_sum': conv_shifted_sum,
                  'toeplitz': conv_toeplitz, 'onednn': conv_onednn}


class Conv(nn.Module):
    """2-D NHWC convolution with the parameter layout of ``nn.Conv`` and an ``impl`` switch."""
    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    padding: str = 'SAME'
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    impl: str = 'auto'
    kernel_init: Callable = default_kernel_init
    bias_init: Callable = nn.initializers.zeros
    activation: Callable[[jax.Array], jax.Array] | None = None  # applied with the bias: bias_activation
    # oneDNN's threads for this layer (onednn.conv): 0 all, 1 one, for layers XLA runs beside others;
    # pieces of its batch for XLA's idle threads: 1 none, 0 one a thread of XLA's pool; its width
    # folded into channels, onednn_fold pixels a group (onednn.conv_folded: for few output channels)
    onednn_threads: int = 0
    onednn_pieces: int = 1
    onednn_fold: int = 1
    # a max pool run on the conv's output before the bias and activation: it commutes with them
    # when the activation is non-decreasing (MONOTONE_ACTIVATIONS), which then run on its output
    pool: Callable[[jax.Array], jax.Array] | None = None

    @nn.compact
    def __call__(self, x: jax.Array, add_bias: bool = True) -> jax.Array:
        """``add_bias=False`` leaves the bias (still a parameter) out: conv_batch_norm."""
        kh, kw = _pair(self.kernel_size)
        kernel = self.param('kernel', self.kernel_init, (kh, kw, x.shape[-1], self.features),
                            self.param_dtype)
        impl = resolve_conv_impl(self.impl)
        fn = CONV_FUNCTIONS[impl]
        if impl in ('hybrid', 'onednn'):
            fn = functools.partial(fn, onednn_threads=self.onednn_threads, onednn_pieces=self.onednn_pieces,
                                   onednn_fold=self.onednn_fold)
        y = fn(x.astype(self.dtype), kernel.astype(self.dtype), _pair(self.strides), self.padding)
        if self.pool is not None:
            y = self.pool(y)
        bias = None
        if self.use_bias:
            bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            bias = bias.astype(self.dtype) if add_bias else None
        if self.activation is not None:
            return bias_activation(y, bias, self.activation)
        return y if bias is None else y + bias


def _max_pool_forward(x, window, strides, pads):
    """Max over the window's views of the -inf-padded input, and the index (row-major, int8
    for windows of up to 127 pixels) of the first view holding it: ties go to the first, as
    in reduce_window's gradient."""
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
    out_hw = _out_hw(xp.shape[1:3], window, strides)
    index_dtype = jnp.int8 if window[0] * window[1] <= 127 else jnp.int32
    pooled = argmax = None
    for t, view in enumerate(_shifted_slices(xp, window, strides, out_hw)):
        if pooled is None:
            pooled, argmax = view, jnp.zeros(view.shape, index_dtype)
            continue
        better = view > pooled
        pooled = jnp.where(better, view, pooled)
        argmax = jnp.where(better, jnp.asarray(t, index_dtype), argmax)
    return pooled, argmax


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_slices(x, window, strides, pads):
    return _max_pool_forward(x, window, strides, pads)[0]


def _max_pool_slices_fwd(x, window, strides, pads):
    pooled, argmax = _max_pool_forward(x, window, strides, pads)
    if _windows_tile(window, strides):
        # Written once (as a float: materialize needs one): otherwise XLA:CPU recomputed the
        # argmax, every view and comparison of the forward, in the backward's broadcast
        # select once per pixel of each window.
        argmax = materialize(argmax.astype(jnp.float32))
    return pooled, (argmax, x.shape)


def _windows_tile(window, strides) -> bool:
    return tuple(window) == tuple(strides)


def _spread_by_phase(argmax, g, window, strides, padded_hw):
    """Each window's gradient moved to the padded-input pixel its argmax names, gathered per
    pixel: padded row s*a + r receives from the window offsets i = r (mod s), of output row
    a - i // s. Per phase (r, q) of the stride that is a sum of selects over shifted slices
    of the (padded) gradient and argmax, which XLA fuses into one pass; the phases are then
    interleaved. Returns at least the padded input's rows and columns."""
    (kh, kw), (sh, sw), (oh, ow) = window, strides, g.shape[1:3]
    rows, cols = -(-padded_hw[0] // sh), -(-padded_hw[1] // sw)  # strided blocks of the padded input
    top_shift, left_shift = (kh - 1) // sh, (kw - 1) // sw
    spread = ((0, 0), (top_shift, rows - oh), (left_shift, cols - ow), (0, 0))
    g, argmax = jnp.pad(g, spread), jnp.pad(argmax, spread, constant_values=-1)
    zero = jnp.zeros((), g.dtype)
    phases = []
    for r in range(sh):
        for q in range(sw):
            phase = jnp.zeros((g.shape[0], rows, cols, g.shape[3]), g.dtype)
            for i in range(r, kh, sh):
                for j in range(q, kw, sw):
                    window_slice = (slice(None), slice(top_shift - i // sh, top_shift - i // sh + rows),
                                    slice(left_shift - j // sw, left_shift - j // sw + cols))
                    phase = phase + jnp.where(argmax[window_slice] == i * kw + j, g[window_slice], zero)
            phases.append(phase)
    dxp = jnp.stack(phases).reshape(sh, sw, *phases[0].shape)
    return dxp.transpose(2, 3, 0, 4, 1, 5).reshape(g.shape[0], rows * sh, cols * sw, g.shape[3])


def _max_pool_slices_bwd(window, strides, pads, residuals, g):
    """Each window's gradient goes to the input pixel its argmax names, in one elementwise
    pass (_spread_by_phase; one broadcast select when the windows tile the input). Autodiff
    of the forward makes a chain of selects and slice transposes instead, each its own pass
    over memory."""
    argmax, shape = residuals
    (kh, kw), (oh, ow) = window, g.shape[1:3]
    padded_hw = [n + lo + hi for n, (lo, hi) in zip(shape[1:3], pads)]
    if _windows_tile(window, strides):  # no shifts
        # Likewise the pooled gradient: LeNet-5's is the second conv's input gradient, ten
        # padded slices of its matmul's output, which XLA had summed again for every pixel
        # of a window. (Overlapping windows, GoogLeNet's and AlexNet's 3x3s, measured no
        # faster with both barriers; each alone was not measured there.)
        g = materialize(g)
        offsets = jnp.arange(kh * kw, dtype=argmax.dtype).reshape(1, 1, kh, 1, kw, 1)
        dxp = jnp.where(argmax[:, :, None, :, None] == offsets, g[:, :, None, :, None], jnp.zeros((), g.dtype))
        dxp = dxp.reshape(g.shape[0], oh * kh, ow * kw, g.shape[3])
        dxp = jnp.pad(dxp, ((0, 0), (0, padded_hw[0] - oh * kh), (0, padded_hw[1] - ow * kw), (0, 0)))
    else:
        dxp = _spread_by_phase(argmax, g, window, strides, padded_hw)
    (top, _), (left, _) = pads
    return (dxp[:, top:top + shape[1], left:left + shape[2]],)


_max_pool_slices.defvjp(_max_pool_slices_fwd, _max_pool_slices_bwd)


def max_pool(x: jax.Array, window: int, strides: int, padding: str | Sequence[tuple[int, int]] = 'VALID',
             impl: str = 'auto') -> jax.Array:
    """Max pooling; padded positions ('SAME', or explicit (lo, hi) pairs for rows and
    columns) count as -inf, as in Keras.

    impl 'slices': max over the window's strided views, keeping the index of the first
    maximum for a one-pass backward (_max_pool_slices_bwd). XLA:CPU runs
    reduce_window's backward (select_and_scatter) several times slower.
    """
    window, strides = _pair(window), _pair(strides)
    impl = resolve_pool_impl(impl)
    if isinstance(padding, str):
        pads = _pads(x.shape[1:3], window, strides, padding)
    else:
        pads = tuple(tuple(p) for p in padding)
    if impl == 'xla':
        return nn.max_pool(x, window, strides, padding=pads)
    return _max_pool_slices(x, window, strides, tuple(pads))


class BatchNorm(nn.Module):
    """``flax.linen.BatchNorm``'s variables and arithmetic (float32 statistics, variance as
    E[x^2] - E[x]^2), plus a ``shift``: a per-channel constant that x is taken to include
    without x + shift being formed (conv_batch_norm). Batch statistics do not see a constant
    shift; the running mean and normalisation with it do."""
    use_running_average: bool
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, shift: jax.Array | None = None,
                 activation: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
        """``activation`` (optional) is applied to the normalised map in the same pass
        (channelwise)."""
        features = (x.shape[-1],)
        ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, features, jnp.float32)
        ra_var = self.variable('batch_stats', 'var', jnp.ones, features, jnp.float32)
        shift = jnp.zeros(features, jnp.float32) if shift is None else shift.astype(jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value - shift, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            x32 = x.astype(jnp.float32)
            mean = x32.mean(axes)
            var = jnp.maximum(0.0, lax.square(x32).mean(axes) - lax.square(mean))
            if not self.is_initializing():
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * (mean + shift)
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        scale = self.param('scale', nn.initializers.ones, features, jnp.float32)
        bias = self.param('bias', nn.initializers.zeros, features, jnp.float32)
        def normalise(x, mean, factor, bias):
            y = ((x - mean) * factor + bias).astype(self.dtype)
            return y if activation is None else activation(y)

        return channelwise(normalise, x, mean, lax.rsqrt(var + self.epsilon) * scale, bias)


def batch_norm(train: bool, dtype: Any, name: str | None = None, frozen: bool = False) -> BatchNorm:
    """Keras-default BatchNorm. ``frozen`` always normalises with the running
    statistics (never updated), reproducing Keras layers called with training=False."""
    return BatchNorm(use_running_average=frozen or not train, dtype=dtype, name=name)


def conv_batch_norm(conv: Conv, norm: BatchNorm, x: jax.Array,
                    activation: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """activation(norm(conv(x))), conv's bias handed to the BatchNorm as its shift instead of added.
    In training the batch mean cancels the bias, so XLA:CPU no longer writes conv(x) + bias
    in a pass of its own (it cannot fuse an add into a matmul or convolution), and the
    bias's gradient, exactly zero, is no longer computed as a sum of rounding errors."""
    y = conv(x, add_bias=False)
    return norm(y, shift=conv.get_variable('params', 'bias') if conv.use_bias else None,
                activation=activation)


def dense(features: int, dtype: Any, name: str | None = None) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=default_kernel_init, name=name)


@custom_batching.custom_vmap
def _fusion_barrier(x: jax.Array) -> jax.Array:
    # XLA:CPU drops lax.optimization_barrier before fusion; a conditional it cannot resolve
    # at compile time stops fusion at its boundary. The branches must differ or XLA folds
    # the cond; the second runs only when x's first element is NaN, and then adds
    # nan_to_num(NaN) = 0: x is returned as it is either way. (It had added the NaN, which
    # under vmap spread one diverging sweep member's NaN to all the others.)
    first = x.reshape(-1)[0]
    return lax.cond(first == first, lambda v: v, lambda v: v + jnp.nan_to_num(first), x)


@_fusion_barrier.def_vmap
def _(axis_size, in_batched, x):
    # vmap (sweep members) would turn a batched predicate into a select of both branches:
    # put the barrier around the whole batched array instead.
    return _fusion_barrier(x), in_batched[0]


def materialize(x: jax.Array) -> jax.Array:
    """Identity that XLA:CPU computes once and writes to memory (elsewhere: plain identity).

    XLA:CPU fuses a cheap producer into every fusion that reads it, so an Inception
    block's output (four branches' BatchNorm + ReLU, concatenated) was recomputed by
    each of its readers: the next block's padded max pool, its 1x1 convs' operand
    and the pool's argmax. Written once, GoogLeNet's forward pad and concatenate
    fusions fell from 24 to 11 ms a step at batch 128 (the step: 4-8% faster). Gradients
    of MATERIALIZE_GRAD_BYTES and more are written once too (_materialized_bwd).
    Measured on the CPU only; on a GPU a conditional's predicate would sync with the host.
    Floating-point arrays only: on integers XLA folds the barrier's predicate (x == x) away.
    """
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f'materialize takes floating-point arrays, got {x.dtype}')
    if jax.default_backend() != 'cpu':
        return x
    return _materialized(x)


@jax.custom_vjp
def _materialized(x: jax.Array) -> jax.Array:
    return _fusion_barrier(x)


def _materialized_fwd(x):
    return _materialized(x), None


# Gradients at least this large also go through the barrier on the way back (below it the
# recomputation runs in cache and the extra conditional cost more than it saved). 4 MiB until
# 2026-12-05: on the AVX2 EPYC, before oneDNN, GoogLeNet at batch 32 (its block gradients 1-2 MiB)
# ran 0.94x with them written once (3 of 4 rounds, separate processes). On the AVX-512 Xeon with
# oneDNN, in one process, 2 MiB 1.061x (11 of 11 rounds), 1 MiB 1.047x, 256 KiB 1.043x; at 128
# 1.00x. (Without the barrier XLA sums a block's gradient in four fusions, one per branch's slice
# of 16 channels, each reading its operands' 64 channels strided.)
MATERIALIZE_GRAD_BYTES = 2 * 2 ** 20


def _materialized_bwd(_, g):
    # The gradient reaching a block's output is a sum over its readers (the next block's
    # three 1x1 convs' input gradients and its pool's backward), which XLA otherwise
    # recomputes in every fusion that reads it: each branch's BatchNorm reductions and its
    # ReLU/BatchNorm backward.
    if g.size * g.dtype.itemsize >= MATERIALIZE_GRAD_BYTES:
        g = _fusion_barrier(g)
    return (g,)


_materialized.defvjp(_materialized_fwd, _materialized_bwd)


# Maps of at most this many channels take channelwise's row view on the CPU (LeNet-5's 6 and 16,
# GoogLeNet's 16-filter layers); GoogLeNet's 32-filter BatchNorms measured no faster with it.
ROW_VIEW_MAX_CHANNELS = 16


def channelwise(fn: Callable[..., jax.Array], y: jax.Array, *vectors: jax.Array) -> jax.Array:
    """``fn(y, *vectors)``, an elementwise function of an NHWC map and per-channel vectors
    (broadcast over its last axis); on the CPU, for maps of up to ROW_VIEW_MAX_CHANNELS channels,
    computed on the map's (n * h, w * c) view.

    XLA:CPU's loop fusions run 2-3x slower per element over rows of 16 floats than of 256, and
    emit exp (sigmoid, tanh, ...) as scalar code in many loops of more than two dimensions or
    that read an operand through a reshape: sigmoid over (32, 10, 10, 16) took 320 us, over the
    same data as (320, 160) 46 us. Each vector's row (tiled w times) is a matmul with a constant
    0/1 matrix, as a tiled broadcast fused into fn is read through a reshape too; its transpose
    sums the vector's gradient over rows. The gradient reaching the 4-D output is written once
    before it is viewed as rows: else XLA fused the max pool's backward into the activation's
    derivative on the 2-D view, read through a reshape (LeNet-5's first conv: 0.10 -> 0.24 ms).
    Measured: LeNet-5's bias + sigmoid ~10% faster at batch 32, ~4% at 128; GoogLeNet's
    16-channel BatchNorm + ReLU 1.06x at batch 32 (16 of 21 rounds faster, tools/ab_bench.py)
    and 1.05x at 128 (10 of 15); see docs/performance.md.
    """
    if jax.default_backend() != 'cpu' or y.ndim != 4 or y.shape[-1] > ROW_VIEW_MAX_CHANNELS:
        return fn(y, *vectors)
    n, h, w, c = y.shape
    tile = np.tile(np.eye(c), w)
    rows = fn(y.reshape(n * h, w * c), *(v @ jnp.asarray(tile, v.dtype) for v in vectors))
    return _gradient_barrier(rows.reshape(n, h, w, c))


def bias_activation(y: jax.Array, bias: jax.Array | None, activation: Callable[[jax.Array], jax.Array]
                    ) -> jax.Array:
    """``activation(y + bias)`` on an NHWC map, computed channelwise (on the CPU: as rows)."""
    if bias is None:
        return channelwise(activation, y)
    return channelwise(lambda y, bias: activation(y + bias), y, bias)


@jax.custom_vjp
def _gradient_barrier(x: jax.Array) -> jax.Array:
    """Identity whose incoming gradient is written once (_fusion_barrier)."""
    return x


def _gradient_barrier_fwd(x):
    return x, None


def _gradient_barrier_bwd(_, g):
    return (_fusion_barrier(g),)


_gradient_barrier.defvjp(_gradient_barrier_fwd, _gradient_barrier_bwd)


def global_avg_pool(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=(1, 2))


def flatten(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


def count_params(tree) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(tree)))
