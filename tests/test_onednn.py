"""The oneDNN convolutions (models/onednn.py): the same outputs and gradients as XLA's, and the
hybrid conv's use of them. Skipped where oneDNN is not installed (apt-get install libdnnl-dev)."""

import functools
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cifar_flax.models import MODEL_NAMES, get_model, layers, onednn

pytestmark = pytest.mark.skipif(not onednn.available(), reason='oneDNN not available (apt-get install libdnnl-dev)')


def _lowered(fn, *args) -> str:
    # a fresh function each time: jit caches traces per function, and the switches are read at trace time
    return jax.jit(lambda *a: fn(*a)).lower(*args).as_text()


def _loss(conv):
    # a nonlinear readout, so that the output gradient differs per pixel
    return lambda x, k: jnp.sum(jnp.sin(conv(x, k)))


@pytest.mark.parametrize('threads', [0, 1])
@pytest.mark.parametrize('shape,k,strides,padding', [
    ((2, 9, 9, 5, 7), 3, (1, 1), 'SAME'), ((3, 8, 10, 6, 4), 3, (2, 2), 'SAME'), ((2, 7, 7, 3, 5), 3, (1, 1), 'VALID'),
    ((2, 12, 12, 4, 6), 5, (1, 1), 'SAME'), ((1, 9, 11, 8, 3), 5, (2, 1), 'VALID'), ((2, 6, 6, 4, 4), 1, (1, 1), 'SAME')])
def test_conv_matches_xla_with_gradients(shape, k, strides, padding, threads):
    n, h, w, cin, cout = shape
    x = jax.random.normal(jax.random.key(0), (n, h, w, cin))
    kernel = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) * 0.3
    pads = lax.padtype_to_pads((h, w), (k, k), strides, padding)
    ref = jax.value_and_grad(_loss(lambda x, k: lax.conv_general_dilated(
        x, k, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))), (0, 1))(x, kernel)
    got = jax.jit(jax.value_and_grad(_loss(lambda x, k: onednn.conv(x, k, strides, pads, threads)), (0, 1)))(x, kernel)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-4)
    for g, r in zip(got[1], ref[1]):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('k,pieces', [(3, 1), (5, 0)])
def test_narrow_forward_runs_as_input_grad_and_matches_xla(k, pieces, monkeypatch):
    """A stride-1 'same' layer of at most 16 channels: its forward is oneDNN's input gradient of
    the flipped kernel (onednn.forward_as_input_grad), with XLA's outputs and gradients."""
    monkeypatch.setattr(onednn, 'FORWARD_AS_INPUT_GRAD_MIN_PIXELS', 2 * 9 * 9)
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 5))
    kernel = jax.random.normal(jax.random.key(1), (k, k, 5, 7)) * 0.3
    pads = ((k // 2, k // 2), (k // 2, k // 2))
    conv = lambda x, kernel: onednn.conv(x, kernel, (1, 1), pads, 1, pieces)
    text = _lowered(conv, x, kernel)
    assert 'onednn_conv_input_grad' in text and 'onednn_conv_forward' not in text
    ref = jax.value_and_grad(_loss(lambda x, k: lax.conv_general_dilated(
        x, k, (1, 1), pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))), (0, 1))(x, kernel)
    got = jax.jit(jax.value_and_grad(_loss(conv), (0, 1)))(x, kernel)
    for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('shape,strides,pads', [
    ((2, 9, 9, 5, 7), (2, 2), ((1, 1), (1, 1))),    # strided
    ((2, 9, 9, 5, 7), (1, 1), ((0, 0), (0, 0))),    # 'valid'
    ((2, 9, 9, 5, 32), (1, 1), ((1, 1), (1, 1))),   # wide
    ((1, 9, 9, 5, 7), (1, 1), ((1, 1), (1, 1)))])   # under the pixel floor
def test_forward_kernel_kept_elsewhere(shape, strides, pads, monkeypatch):
    monkeypatch.setattr(onednn, 'FORWARD_AS_INPUT_GRAD_MIN_PIXELS', 2 * 9 * 9)
    n, h, w, cin, cout = shape
    x, kernel = jnp.ones((n, h, w, cin)), jnp.ones((3, 3, cin, cout))
    text = _lowered(lambda x, k: onednn.conv(x, k, strides, pads, 1, 0), x, kernel)
    assert 'onednn_conv_forward' in text and 'onednn_conv_input_grad' not in text


@pytest.mark.parametrize('pieces', [1, 2])
def test_conv_inside_scan_and_vmap(pieces):
    """Inside lax.scan (train.fit's loop) and vmapped over members (sweeps), as a batch of calls."""
    xs = jax.random.normal(jax.random.key(0), (3, 2, 8, 8, 4))
    kernels = jax.random.normal(jax.random.key(1), (3, 3, 3, 4, 5))
    pads = ((1, 1), (1, 1))

    def step(carry, xk):
        x, k = xk
        return carry + jax.grad(_loss(lambda x, k: onednn.conv(x, k, (1, 1), pads, 1, pieces)), 1)(x, k).sum(), None

    def ref_step(carry, xk):
        x, k = xk
        conv = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        return carry + jax.grad(_loss(conv), 1)(x, k).sum(), None

    got = jax.jit(lambda: lax.scan(step, 0.0, (xs, kernels))[0])()
    ref = lax.scan(ref_step, 0.0, (xs, kernels))[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    vmapped = jax.vmap(lambda x, k: onednn.conv(x, k, (1, 1), pads, 1, pieces))(xs, kernels)
    for m in range(3):
        np.testing.assert_allclose(vmapped[m], onednn.conv(xs[m], kernels[m], (1, 1), pads), rtol=1e-6)


@pytest.mark.parametrize('pieces', [0, 2, 3])
@pytest.mark.parametrize('batch', [1, 2, 3, 4, 5, 8])
def test_conv_in_pieces_matches_one_call(batch, pieces):
    """A call's batch split into pieces (RunPieces: each run by a thread of XLA's pool or by the
    caller; PieceStart: the caller's one image larger where there are more images than pieces):
    the same outputs and input gradient, the kernel gradient summed over pieces."""
    x = jax.random.normal(jax.random.key(0), (batch, 8, 8, 16))
    kernel = jax.random.normal(jax.random.key(1), (5, 5, 16, 8)) * 0.1
    pads = ((2, 2), (2, 2))
    results = [jax.jit(jax.value_and_grad(_loss(lambda x, k: onednn.conv(x, k, (1, 1), pads, 1, p)), (0, 1)))(x, kernel)
               for p in (1, pieces)]
    for a, b in zip(jax.tree_util.tree_leaves(results[0]), jax.tree_util.tree_leaves(results[1])):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('width,k,fold,padding', [
    (32, 5, 2, 'VALID'), (14, 5, 2, 'VALID'), (16, 5, 4, 'VALID'), (12, 3, 2, 'SAME'), (10, 5, 2, 'SAME')])
def test_conv_with_width_folded_matches_conv(width, k, fold, padding):
    """The width folded into channels (onednn.conv_folded): a conv of fold x the channels on the
    reshaped map, with the same outputs and gradients as the plain call."""
    x = jax.random.normal(jax.random.key(0), (3, 9, width, 3))
    kernel = jax.random.normal(jax.random.key(1), (k, k, 3, 6)) * 0.3
    pads = tuple(lax.padtype_to_pads((9, width), (k, k), (1, 1), padding))
    assert onednn.width_fold_applies(width + sum(pads[1]), k, 1, fold)
    folded = lambda x, kernel: onednn.conv_folded(x, kernel, (1, 1), pads, 1, 0, fold)
    taps = (k + fold - 2) // fold + 1
    assert f'tensor<{k}x{taps}x{3 * fold}x{6 * fold}xf32>' in _lowered(folded, x, kernel)
    ref, got = (jax.jit(jax.value_and_grad(_loss(f), (0, 1)))(x, kernel)
                for f in (lambda x, kernel: onednn.conv(x, kernel, (1, 1), pads, 1, 0), folded))
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('width,stride,fold', [(9, 1, 2), (10, 1, 4), (10, 2, 2)])
def test_conv_folded_falls_back_where_the_fold_does_not_fit(width, stride, fold):
    """An odd width (or output width), or a strided conv: the plain call, unfolded."""
    x = jax.random.normal(jax.random.key(0), (2, 8, width, 3))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 6))
    pads = ((0, 0), (0, 0))
    assert not onednn.width_fold_applies(width, 3, stride, fold)
    text = _lowered(lambda x, k: onednn.conv_folded(x, k, (1, stride), pads, 1, 0, fold), x, kernel)
    assert 'tensor<3x3x3x6xf32>' in text and f'x{3 * fold}x{6 * fold}xf32>' not in text
    np.testing.assert_array_equal(onednn.conv_folded(x, kernel, (1, stride), pads, 1, 0, fold),
                                  onednn.conv(x, kernel, (1, stride), pads, 1, 0))


def test_hybrid_hands_wide_layers_to_onednn_and_matches_xla(monkeypatch):
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 16))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 16, 8)) * 0.1
    text = _lowered(jax.grad(_loss(layers.conv_hybrid), (0, 1)), x, kernel)
    assert text.count('onednn_conv_') == 3  # forward, input and kernel gradient
    got = jax.grad(_loss(layers.conv_hybrid), (0, 1))(x, kernel)
    ref = jax.grad(_loss(layers.conv_xla), (0, 1))(x, kernel)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(layers, 'ONEDNN_CONV', False)
    assert 'onednn_conv_' not in _lowered(layers.conv_hybrid, x, kernel)


@pytest.mark.parametrize('shape,expect', [
    ((2, 6, 6, 16, 8), True),  # 36 output pixels
    ((2, 4, 4, 16, 8), False),  # 16 pixels: Winograd / im2col win on small maps
    ((2, 8, 8, 4, 8), True),  # few input channels too (first layers: no longer the banded matmul)
    ((2, 8, 8, 16, 8), True)])
def test_hybrid_onednn_rule(shape, expect):
    n, h, w, cin, cout = shape
    x = jnp.zeros((n, h, w, cin))
    assert ('onednn_conv_' in _lowered(layers.conv_hybrid, x, jnp.zeros((3, 3, cin, cout)))) == expect
    assert 'onednn_conv_' not in _lowered(layers.conv_hybrid, x, jnp.zeros((1, 1, cin, cout)))


def test_threads_and_pieces_per_network():
    """GoogLeNet's branches' convs and LeNet-5's ask for one thread each and split their batch into
    pieces for XLA's pool (0: one a thread); GoogLeNet's stem and ResNet-18's convs ask for all
    threads, in one piece."""
    for name, expect in (('inception10', {('1', '0'), ('0', '1')}), ('resnet18', {('0', '1')}),
                         ('lenet5', {('1', '0')})):
        model, x = get_model(name), jnp.zeros((2, 32, 32, 3))
        variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
        text = _lowered(lambda v, x: model.apply(v, x), variables, x)
        found = set(re.findall(r'pieces = (\d+) : i64.*threads = (\d+) : i64', text))
        assert {(threads, pieces) for pieces, threads in found} == expect, (name, found)


@pytest.mark.parametrize('x_dtype, kernel_dtype', [(jnp.bfloat16, jnp.float32), (jnp.float16, jnp.float16)])
def test_explicit_impl_rejects_mixed_or_unsupported_dtypes(x_dtype, kernel_dtype):
    with pytest.raises(ValueError, match='float32 or bfloat16'):
        layers.conv_onednn(jnp.zeros((1, 8, 8, 4), x_dtype), jnp.zeros((3, 3, 4, 4), kernel_dtype))


@pytest.mark.parametrize('shape, kernel', [((4, 10, 10, 16), 3), ((4, 12, 12, 8), 5)])
def test_bfloat16_as_accurate_as_xla_bfloat16(shape, kernel):
    """In bfloat16 (AMX or AVX-512-BF16 kernels where the CPU has them) the output and both
    gradients are of the input's type, the kernel gradient computed in float32, and no further
    from the float32 result than XLA's own bfloat16 convolution (itself run in float32 and
    rounded) is."""
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(k1, shape)
    w = jax.random.normal(k2, (kernel, kernel, shape[-1], 24)) * 0.2
    g = jax.random.normal(k3, (*shape[:3], 24))
    pad = (kernel - 1) // 2
    pads = ((pad, pad), (pad, pad))

    def out_and_grads(fn, dtype):
        y, vjp = jax.vjp(fn, x.astype(dtype), w.astype(dtype))
        return (y, *vjp(g.astype(dtype)))

    xla = lambda a, b: lax.conv_general_dilated(a, b, (1, 1), pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                               precision=lax.Precision.HIGHEST)
    ours = jax.jit(lambda a, b: onednn.conv(a, b, (1, 1), pads, 1, 2))
    text = ours.lower(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)).as_text()
    calls = [line for line in text.splitlines() if 'onednn_conv_' in line]
    assert calls and all('bf16>' in line and 'f32>' not in line for line in calls)
    want = out_and_grads(xla, jnp.float32)
    for got, theirs, ref in zip(out_and_grads(ours, jnp.bfloat16), out_and_grads(xla, jnp.bfloat16), want):
        assert got.dtype == jnp.bfloat16
        error = float(jnp.abs(got.astype(jnp.float32) - ref).max() / jnp.abs(ref).max())
        xla_error = float(jnp.abs(theirs.astype(jnp.float32) - ref).max() / jnp.abs(ref).max())
        assert error < 1e-2 and error <= 2 * xla_error + 1e-3, (error, xla_error)


def test_float32_in_bfloat16_products_under_matmul_precision():
    """Under jax.default_matmul_precision('bfloat16') float32 operands go to oneDNN rounded to
    bfloat16 (its bfloat16 kernels), the result and both gradients float32: as close to the
    float32 result as the bfloat16 operands' own convolution, and not bitwise float32's."""
    k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
    x = jax.random.normal(k1, (4, 10, 10, 16))
    w = jax.random.normal(k2, (3, 3, 16, 24)) * 0.2
    g = jax.random.normal(k3, (4, 10, 10, 24))
    pads = ((1, 1), (1, 1))

    def out_and_grads(x, w):
        y, vjp = jax.vjp(lambda a, b: onednn.conv(a, b, (1, 1), pads, 1, 2), x, w)
        return (y, *vjp(g.astype(y.dtype)))

    full = jax.jit(out_and_grads)(x, w)
    with jax.default_matmul_precision('bfloat16'):
        fast = jax.jit(out_and_grads)(x, w)
        text = jax.jit(out_and_grads).lower(x, w).as_text()
    bf16 = jax.jit(out_and_grads)(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    calls = [line for line in text.splitlines() if 'onednn_conv_' in line]
    assert len(calls) == 3 and all('bf16>' in line for line in calls)
    for got, rounded, want in zip(fast, bf16, full):
        assert got.dtype == jnp.float32
        error = float(jnp.abs(got - want).max() / jnp.abs(want).max())
        rounded_error = float(jnp.abs(rounded.astype(jnp.float32) - want).max() / jnp.abs(want).max())
        assert 0 < error < 1e-2 and error <= 1.5 * rounded_error, (error, rounded_error)


@pytest.mark.parametrize('precision, operand_type', [('default', 'f32>'), ('bfloat16', 'bf16>')])
def test_config_matmul_precision_reaches_the_train_step(precision, operand_type):
    """Config.matmul_precision is applied where the train step and evaluation are traced."""
    import optax

    from cifar_flax import train
    from cifar_flax.config import make_config
    config = make_config('vgg16', 'seed', batch_size=2, matmul_precision=precision, eval_batch_size=2)
    model = get_model('vgg16')
    tx = optax.adam(1e-3)
    state = jax.eval_shape(lambda: train.create_train_state(config, model, tx))
    images, labels = jnp.zeros((2, 32, 32, 3)), jnp.zeros((2,), jnp.int32)
    variables = jax.eval_shape(lambda: train.model_variables(state))
    for fn, args in ((train.make_train_step(model, tx, config), (state, (images, labels))),
                     (train.make_evaluate(model, config), (variables, images.astype(jnp.uint8), labels))):
        calls = [line for line in jax.jit(fn).lower(*args).as_text().splitlines() if 'onednn_conv_' in line]
        assert calls and all(operand_type in line.split('->')[0] for line in calls)


def test_hybrid_bfloat16_takes_onednn():
    x, kernel = jnp.zeros((8, 16, 16, 32), jnp.bfloat16), jnp.zeros((3, 3, 32, 32), jnp.bfloat16)
    assert 'onednn_conv_' in _lowered(layers.conv_hybrid, x, kernel)


def test_build_failure_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(onednn, 'SOURCE', tmp_path / 'broken.cc')
    (tmp_path / 'broken.cc').write_text('#include "oneapi/dnnl/no_such_header.hpp"\n')
    with pytest.raises(onednn.OnednnUnavailable, match='libdnnl-dev'):
        onednn.build(tmp_path / 'cache')


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_networks_with_onednn_match_xla(name):
    """Each network's default (hybrid) conv, oneDNN where it applies, against XLA's convolutions:
    eval outputs, and a train-mode loss gradient for the two that hand both narrow (one thread)
    and wide (all threads) layers to oneDNN, and for LeNet-5 (one thread a piece)."""
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    ref_model, model = get_model(name, conv='xla', pool='xla'), get_model(name)
    variables = jax.jit(lambda x: ref_model.init({'params': jax.random.key(1), 'dropout': jax.random.key(2)},
                                                 x, train=False))(x)
    assert 'onednn_conv_' in _lowered(lambda v, x: model.apply(v, x, train=False), variables, x)
    outputs = [jax.jit(lambda v, x, m=m: m.apply(v, x, train=False))(variables, x) for m in (ref_model, model)]
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)
    if name not in ('inception10', 'resnet18', 'lenet5'):
        return

    def loss(m, params):
        logits, _ = m.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
        return jnp.sum(jnp.sin(logits))

    ref, got = (jax.jit(jax.grad(functools.partial(loss, m)))(variables['params']) for m in (ref_model, model))
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_layer_bench_tool_times_every_kxk_conv(capsys):
    spec = importlib.util.spec_from_file_location(
        'onednn_layer_bench', Path(__file__).resolve().parents[1] / 'tools' / 'onednn_layer_bench.py')
    onednn_layer_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(onednn_layer_bench)
    onednn_layer_bench.main(['--batch', '2', '--reps', '1', '--models', 'lenet5'])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and 'kernel (5, 5, 3, 6)' in lines[1] and 'kernel (5, 5, 6, 16)' in lines[2]
    assert all('oneDNN' in line and line.endswith('x') for line in lines[1:])


@pytest.mark.parametrize('batch,expect', [(32, False), (64, True), (128, True)])
def test_winograd_keeps_small_calls(batch, expect):
    """8x8x256 (Winograd's forward applies) goes to oneDNN from 4,096 output pixels a call."""
    x, kernel = jnp.zeros((batch, 8, 8, 256)), jnp.zeros((3, 3, 256, 256))
    assert layers.winograd_conv_applies(x.shape, kernel.shape, (1, 1), 'SAME')
    assert ('onednn_conv_' in _lowered(layers.conv_hybrid, x, kernel)) == expect


@pytest.mark.parametrize('bfloat16', ['dtype', 'products'])
def test_bfloat16_takes_winograd_layers_at_any_batch(bfloat16):
    """In bfloat16 (a bfloat16 network, or float32 in bfloat16 products) oneDNN takes the layers
    Winograd would from any number of output pixels: 8x8x256 at batch 32 too."""
    dtype = jnp.bfloat16 if bfloat16 == 'dtype' else jnp.float32
    x, kernel = jnp.zeros((32, 8, 8, 256), dtype), jnp.zeros((3, 3, 256, 256), dtype)
    with jax.default_matmul_precision('bfloat16' if bfloat16 == 'products' else 'highest'):
        assert 'onednn_conv_' in _lowered(layers.conv_hybrid, x, kernel)


def test_cpu_without_bfloat16_kernels_falls_back():
    """On a CPU whose oneDNN has no bfloat16 convolutions (AVX2 only, simulated with
    ONEDNN_MAX_CPU_ISA), bfloat16 layers keep the XLA forms, bfloat16 products stay float32, and
    asking for oneDNN in bfloat16 says why it cannot: training never reaches a failing call."""
    script = textwrap.dedent('''
        import jax, jax.numpy as jnp
        from cifar_flax.models import layers, onednn
        assert onednn.available() and not onednn.bfloat16_supported()
        lowered = lambda fn, *a: jax.jit(fn).lower(*a).as_text()
        x, k = jnp.zeros((8, 16, 16, 32), jnp.bfloat16), jnp.zeros((3, 3, 32, 32), jnp.bfloat16)
        assert 'onednn_conv_' not in lowered(layers.conv_hybrid, x, k)
        with jax.default_matmul_precision('bfloat16'):
            text = lowered(layers.conv_hybrid, x.astype(jnp.float32), k.astype(jnp.float32))
        calls = [line for line in text.splitlines() if 'onednn_conv_' in line]
        assert calls and not any('bf16>' in line for line in calls)
        try:
            layers.conv_onednn(x, k)
        except onednn.OnednnUnavailable as e:
            assert 'bfloat16' in str(e)
        else:
            raise AssertionError('conv_onednn took bfloat16 without kernels for it')
        print('ok')
    ''')
    _run_in_fresh_process(script, ONEDNN_MAX_CPU_ISA='AVX2')


def test_first_load_under_bfloat16_precision():
    """The library's first load (its test convolution) may happen while a model is traced under
    jax.default_matmul_precision('bfloat16'): it must not recurse into itself through the
    bfloat16 probe (it did, until the probes called the handler directly)."""
    _run_in_fresh_process(textwrap.dedent('''
        import jax
        from cifar_flax.models import onednn
        with jax.default_matmul_precision('bfloat16'):
            assert onednn.available() and onednn.bfloat16_supported()
        print('ok')
    '''))


def _run_in_fresh_process(script: str, **env):
    """``script`` in a new interpreter (oneDNN's load and its probes are once per process)."""
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and out.stdout.strip().endswith('ok'), out.stderr[-2000:]
