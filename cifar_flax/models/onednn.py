"""oneDNN convolutions on the CPU, called from XLA through its FFI (`cifar_flax/csrc/onednn_conv.cc`).

oneDNN is what PyTorch and TF-Keras run their CPU convolutions on. On the wide layers of
large maps (ResNet-18's and VGG16's 32x32x64 and 16x16x128 3x3s) its direct convolutions
train about twice as fast as XLA:CPU's own or our matmul forms (docs/performance.md), so
`layers.conv_hybrid` hands those layers to it when it is here.

It is here when the oneDNN development files are installed (Debian/Ubuntu: `apt-get install
libdnnl-dev`) and a C++ compiler is on the PATH: the handlers are compiled once per source
and jaxlib version into the user cache (`$XDG_CACHE_HOME/cifar_flax`, else
`~/.cache/cifar_flax`) and registered with XLA on first use. Without them, or with
`CIFAR_FLAX_ONEDNN=0` in the environment, `available()` is False and the XLA forms are used:
the same parameters and results within float tolerance.

They take bfloat16 as well, which oneDNN runs on AMX or AVX-512-BF16 kernels where the CPU
has them: a network built with ``dtype=bfloat16``, or float32 operands multiplied in bfloat16
under ``jax.default_matmul_precision('bfloat16')`` (``Config.matmul_precision``), which keeps
everything else float32.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).resolve().parents[1] / 'csrc' / 'onednn_conv.cc'
TARGETS = {'forward': 'OnednnConvForward', 'input_grad': 'OnednnConvInputGrad',
           'kernel_grad': 'OnednnConvKernelGrad'}
ENV_SWITCH = 'CIFAR_FLAX_ONEDNN'


class OnednnUnavailable(RuntimeError):
    """The oneDNN convolutions cannot be built or loaded here; the message says why."""


def _cache_dir() -> Path:
    base = os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache'
    return Path(base) / 'cifar_flax'


def _compiler() -> str:
    for name in (os.environ.get('CXX'), 'g++', 'c++', 'clang++'):
        if name and shutil.which(name):
            return name
    raise OnednnUnavailable('no C++ compiler (g++, c++ or clang++) on the PATH')


def build(cache_dir: Path | None = None) -> Path:
    """Compile the handlers (once per source and jaxlib version) and return the library's path."""
    source = SOURCE.read_bytes()
    versions = f"{jax.__version__} {importlib.metadata.version('jaxlib')}".encode()
    digest = hashlib.sha256(source + versions).hexdigest()[:16]
    target = (cache_dir or _cache_dir()) / f'onednn_conv-{digest}.so'
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compiled to a private name, then renamed: concurrent processes (pytest -n) never load half a file.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        command = [_compiler(), '-O2', '-shared', '-fPIC', '-std=c++17', '-w', '-fopenmp',
                   f'-I{jax.ffi.include_dir()}', str(SOURCE), '-o', str(out), '-ldnnl']
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            hint = ' (install the oneDNN headers: apt-get install libdnnl-dev)' if 'dnnl' in result.stderr else ''
            raise OnednnUnavailable(f'building {SOURCE.name} failed{hint}:\n{result.stderr[-2000:]}')
        os.replace(out, target)
    return target


@functools.cache
def _load() -> str | None:
    """Build and register the FFI targets once per process; None on success, else why not."""
    if os.environ.get(ENV_SWITCH, '1') == '0':
        return f'{ENV_SWITCH}=0'
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
    except (OnednnUnavailable, OSError) as e:
        return str(e)
    for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(f'onednn_conv_{name}', jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform='cpu')
    # A library that builds and loads may still fail at run time (a oneDNN without a usable CPU engine).
    return _test_convolution(np.float32)


def _test_convolution(dtype) -> str | None:
    """One tiny forward handler call in ``dtype``, run now (also when called while a model is being
    traced, under whatever matmul precision): None when it gives the right result, else why not."""
    try:
        with jax.ensure_compile_time_eval():
            out = _call('forward', (1, 2, 2, 1), jnp.ones((1, 2, 2, 1), dtype), jnp.full((1, 1, 1, 1), 2, dtype),
                        strides=(1, 1), pads=((0, 0), (0, 0)), threads=0, pieces=1)
            if not np.array_equal(np.asarray(out, np.float32), np.full((1, 2, 2, 1), 2, np.float32)):
                return f'a test convolution gave {np.asarray(out).ravel()} instead of 2s'
    except jax.errors.JaxRuntimeError as e:
        return f'a test convolution failed: {e}'
    return None


def available() -> bool:
    """True when the oneDNN convolutions can run here: a CPU backend and the library built."""
    return jax.default_backend() == 'cpu' and _load() is None


@functools.cache
def bfloat16_supported() -> bool:
    """Whether oneDNN runs bfloat16 convolutions on this CPU (it needs AVX-512 at least: an
    AVX2-only CPU has no bfloat16 kernels, and the call fails). One tiny convolution, run once."""
    return available() and _test_convolution(jnp.bfloat16) is None


def require() -> None:
    if jax.default_backend() != 'cpu':
        raise OnednnUnavailable(f'the oneDNN convolutions run on the CPU; the backend is {jax.default_backend()!r}')
    reason = _load()
    if reason is not None:
        raise OnednnUnavailable(f'the oneDNN convolutions are not available: {reason}')


def _call(target: str, shape, *operands, strides, pads, threads, pieces, dtype=None):
    """One handler call; its result is of ``dtype``, by default its first operand's."""
    (top, bottom), (left, right) = pads
    attributes = {'stride_h': strides[0], 'stride_w': strides[1], 'pad_top': top, 'pad_left': left,
                  'pad_bottom': bottom, 'pad_right': right, 'threads': threads, 'pieces': pieces}
    # A vmapped call (a sweep's members) runs the members one after another.
    return jax.ffi.ffi_call(f'onednn_conv_{target}', jax.ShapeDtypeStruct(shape, dtype or operands[0].dtype),
                            vmap_method='sequential')(*operands, **{k: np.int64(v) for k, v in attributes.items()})


def conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], pads, threads: int = 0,
         pieces: int = 1) -> jax.Array:
    """NHWC x HWIO -> NHWC convolution; ``pads`` ((top, bottom), (left, right)).

    float32 or bfloat16, both operands the same. In bfloat16 oneDNN runs its AMX or
    AVX-512-BF16 kernels where the CPU has them, accumulating in float32; the kernel gradient is
    computed in float32 and rounded to the kernel's type. float32 operands are multiplied in
    bfloat16 too when traced under ``jax.default_matmul_precision('bfloat16')`` (bfloat16_products):
    rounded to bfloat16 on the way in, the result and both gradients float32.

    ``threads``: 0 runs each of its oneDNN calls on all of oneDNN's OpenMP threads, 1 on one
    (for layers XLA runs beside others: GoogLeNet's branches, models/inception.py).
    ``pieces`` > 1 splits each call's batch into that many convolutions (0: one a thread of XLA's
    intra-op pool), all but the first offered to that pool: a thread XLA leaves idle takes
    them, else the calling thread runs them after its own. Same results (the kernel gradient
    summed over pieces: within float rounding)."""
    return _conv(x, kernel, strides, pads, threads, pieces, bfloat16_products(x.dtype))


def bfloat16_products(dtype) -> bool:
    """Whether float32 operands are multiplied in bfloat16: JAX's precision for float32 matmuls
    and convolutions (``jax.default_matmul_precision``, read when traced) is 'bfloat16', and
    oneDNN has bfloat16 kernels for this CPU (else float32 products, as XLA:CPU's own)."""
    return (dtype == jnp.float32 and jax.config.jax_default_matmul_precision == 'bfloat16'
            and bfloat16_supported())


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _conv(x, kernel, strides, pads, threads, pieces, in_bfloat16):
    return _conv_fwd(x, kernel, strides, pads, threads, pieces, in_bfloat16)[0]


def _conv_fwd(x, kernel, strides, pads, threads, pieces, in_bfloat16):
    result_type = x.dtype
    if in_bfloat16:  # the operands rounded once, kept so for the backward (half the memory)
        x, kernel = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    n, h, w, _ = x.shape
    kh, kw, _, features = kernel.shape
    out_h = (h + sum(pads[0]) - kh) // strides[0] + 1
    out_w = (w + sum(pads[1]) - kw) // strides[1] + 1
    options = dict(strides=strides, pads=pads, threads=threads, pieces=pieces, dtype=result_type)
    if forward_as_input_grad(kernel.shape, strides, pads, n * out_h * out_w):
        # the same sums as the input gradient of a conv whose kernel is this one flipped in
        # space, its channel axes swapped (stride 1, 'same' padding: the same geometry)
        flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
        y = _call('input_grad', (n, out_h, out_w, features), x, flipped, **options)
    else:
        y = _call('forward', (n, out_h, out_w, features), x, kernel, **options)
    return y, (x, kernel)


def _conv_bwd(strides, pads, threads, pieces, in_bfloat16, residuals, g):
    x, kernel = residuals
    result_type = g.dtype  # the operands' before any rounding to bfloat16
    options = dict(strides=strides, pads=pads, threads=threads, pieces=pieces)
    g = g.astype(x.dtype)
    kernel_grad = _call('kernel_grad', kernel.shape, x, g, dtype=np.float32, **options)
    input_grad = _call('input_grad', x.shape, g, kernel, dtype=result_type, **options)
    return input_grad, kernel_grad.astype(result_type)


_conv.defvjp(_conv_fwd, _conv_bwd)


# oneDNN 2.6's forward kernel (brgconv) runs layers of at most 16 channels at about half the
# FLOP/s of its input-gradient kernel (ONEDNN_VERBOSE, one thread, GoogLeNet at batch 32: the
# 16x16x16 3x3 forward 94-111 GFLOP/s, its input gradient 185-190; the 5x5 145-147 against
# 208-209; the stem's 3->16 forward 0.54 ms against 0.43). So such forwards run as input
# gradients. GoogLeNet in one process (tools/ab_bench.py, median paired ratio, rounds faster):
# batch 128 1.026x (7 of 9) and 1.020x (9 of 11); at 32 the 16x16 maps' calls (8,192 pixels)
# 0.991x (4 of 9) and 0.976x (3 of 13), hence the pixel floor (the stem alone at 32: 1.005x,
# 7 of 11). Wider layers: the 8x8x32 3x3s and 5x5s too 0.974x at 32.
FORWARD_AS_INPUT_GRAD_MAX_CHANNELS = 16
FORWARD_AS_INPUT_GRAD_MIN_PIXELS = 16384


def forward_as_input_grad(kernel_shape, strides, pads, out_pixels: int) -> bool:
    """Whether ``conv`` runs its forward as oneDNN's input gradient of the flipped kernel."""
    kh, kw, channels, features = kernel_shape
    same = all(lo == hi == (k - 1) // 2 and k % 2 for (lo, hi), k in zip(pads, (kh, kw)))
    return (tuple(strides) == (1, 1) and same and kh * kw > 1 and out_pixels >= FORWARD_AS_INPUT_GRAD_MIN_PIXELS
            and max(channels, features) <= FORWARD_AS_INPUT_GRAD_MAX_CHANNELS)


def width_fold_applies(width: int, kernel_width: int, stride_width: int, fold: int) -> bool:
    """Whether conv_folded can fold a (padded) input of ``width`` into groups of ``fold`` pixels."""
    out_width = width - kernel_width + 1
    return fold > 1 and stride_width == 1 and width % fold == 0 and out_width > 0 and out_width % fold == 0


def fold_width_kernel(kernel: jax.Array, fold: int) -> jax.Array:
    """The HWIO kernel of a stride-1 conv made to run on maps whose width is folded into channels,
    ``fold`` pixels a group ([n, h, w, c] -> [n, h, w / fold, fold * c], a free reshape): its tap j
    joins input pixel p of group Y + j to output pixel q of group Y through the original tap
    fold * j + p - q (zero where that is outside the kernel)."""
    kh, kw, channels, features = kernel.shape
    taps = (kw + fold - 2) // fold + 1
    select = np.zeros((taps, fold, fold, kw), np.float32)
    for j, p, q in itertools.product(range(taps), range(fold), range(fold)):
        if 0 <= fold * j + p - q < kw:
            select[j, p, q, fold * j + p - q] = 1
    folded = jnp.einsum('htco,jpqt->hjpcqo', kernel, select.astype(kernel.dtype))
    return folded.reshape(kh, taps, fold * channels, fold * features)


def conv_folded(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], pads, threads: int = 0,
                pieces: int = 1, fold: int = 1) -> jax.Array:
    """``conv`` with the width folded into channels, ``fold`` pixels a group, where that fits
    (width_fold_applies, after the left and right pads, which are then written out); else ``conv``.

    For layers of few output channels: oneDNN vectorizes over output channels, so LeNet-5's
    3->6 5x5 fills 6 of a vector's 16 lanes; folded by 2 it is a 6->12 5x3 conv with 1.2x the
    multiply-adds of the original (the folded kernel's zeros) and runs 1.6x faster (lenet.py)."""
    (top, bottom), (left, right) = pads
    _, kw, _, features = kernel.shape
    if not width_fold_applies(x.shape[2] + left + right, kw, strides[1], fold):
        return conv(x, kernel, strides, pads, threads, pieces)
    if left or right:
        x = jnp.pad(x, ((0, 0), (0, 0), (left, right), (0, 0)))
    n, h, w, channels = x.shape
    y = conv(x.reshape(n, h, w // fold, fold * channels), fold_width_kernel(kernel, fold), strides,
             ((top, bottom), (0, 0)), threads, pieces)
    return y.reshape(n, y.shape[1], w - kw + 1, features)
