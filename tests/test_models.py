"""Networks: shapes, exact parameter counts, dtypes, train/eval semantics, conv/pool impls."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from cifar_flax.models import ACTIVATIONS, MODEL_NAMES, count_params, get_model, layers, onednn
from cifar_flax.models.layers import (WINOGRAD_MIN_SIZE, Conv, conv_gemm, conv_hybrid, conv_shifted_sum,
                                      conv_toeplitz, conv_winograd, conv_xla, max_pool, resolve_conv_impl,
                                      toeplitz_block, winograd_conv_applies,
                                      winograd_kernel_grad_applies)

# (trainable params, total size of batch_stats) of the reference Keras models.
EXPECTED_COUNTS = {
    'lenet5': (62_006, 0),
    'alexnet8': (9_638_474, 704),
    'vgg16': (15_253_578, 8_448),
    'inception10': (120_234, 1_184),
    'resnet18': (11_173_962, 9_600),
}
SMALL = ('lenet5', 'inception10')  # cheap enough to run forward passes of in every test


# Everything is jitted: eager op-by-op dispatch compiles every op separately and is far slower.


@pytest.fixture(autouse=True)
def xla_forms(monkeypatch):
    """The hybrid conv without oneDNN: what runs where it is not installed. The oneDNN path is
    compared here as its own impl, and as the hybrid conv's in test_onednn.py."""
    monkeypatch.setattr(layers, 'ONEDNN_CONV', False)


def init(model, batch=2, seed=0):
    x = jax.random.normal(jax.random.key(seed), (batch, 32, 32, 3))
    variables = jax.jit(lambda x: model.init({'params': jax.random.key(1), 'dropout': jax.random.key(2)},
                                             x, train=False))(x)
    return variables, x


def eval_apply(model, variables, x):
    return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)


@functools.partial(jax.jit, static_argnums=0)
def train_apply(model, variables, x, dropout_seed=0):
    return model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(dropout_seed)},
                       mutable=['batch_stats'])


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_param_counts_exact(name):
    model = get_model(name)
    shapes = jax.eval_shape(lambda: init(model)[0])
    assert count_params(shapes['params']) == EXPECTED_COUNTS[name][0]
    assert count_params(shapes.get('batch_stats', {})) == EXPECTED_COUNTS[name][1]
    if name == 'inception10':
        frozen = jax.eval_shape(lambda: init(get_model(name, bn='frozen'))[0])
        assert count_params(frozen['params']) == EXPECTED_COUNTS[name][0]
        assert count_params(frozen['batch_stats']) == EXPECTED_COUNTS[name][1]


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_output_shape_and_dtype(name):
    model = get_model(name, num_classes=7)
    variables, x = init(model, batch=3)
    logits = eval_apply(model, variables, x)
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    logits, updates = train_apply(model, variables, x)
    assert logits.shape == (3, 7)
    assert ('batch_stats' in variables) == (name != 'lenet5')


def test_googlenet_alias():
    assert type(get_model('googlenet')) is type(get_model('inception10'))


@pytest.mark.parametrize('name', SMALL + ('resnet18',))
def test_bfloat16_close_to_float32(name):
    f32 = get_model(name)
    bf16 = get_model(name, dtype='bfloat16')
    variables, x = init(f32, batch=4)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(init(bf16)[0]))
    ref = eval_apply(f32, variables, x)
    out = eval_apply(bf16, variables, x)
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    scale = float(jnp.max(jnp.abs(ref))) + 1e-3
    assert float(jnp.max(jnp.abs(out - ref))) / scale < 0.1
    grads = jax.jit(jax.grad(lambda p: jnp.sum(train_apply(bf16, {**variables, 'params': p}, x)[0])))(
        variables['params'])
    assert all(g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.parametrize('name', ('alexnet8', 'vgg16'))
def test_dropout_active_only_in_train(name):
    model = get_model(name)
    variables, x = init(model)
    a, _ = train_apply(model, variables, x, dropout_seed=0)
    b, _ = train_apply(model, variables, x, dropout_seed=1)
    assert not np.allclose(a, b)
    c, _ = train_apply(model, variables, x, dropout_seed=0)
    np.testing.assert_array_equal(a, c)
    e1 = eval_apply(model, variables, x)
    e2 = jax.jit(lambda v, x: model.apply(v, x, train=False, rngs={'dropout': jax.random.key(5)}))(variables, x)
    np.testing.assert_array_equal(e1, e2)


def test_batch_stats_update_only_in_train():
    model = get_model('inception10')
    variables, x = init(model, batch=4)
    _, updates = train_apply(model, variables, x)
    before = jax.tree_util.tree_leaves(variables['batch_stats'])
    after = jax.tree_util.tree_leaves(updates['batch_stats'])
    assert any(not np.allclose(u, v) for u, v in zip(before, after))
    _, eval_updates = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=['batch_stats']))(variables, x)
    for u, v in zip(before, jax.tree_util.tree_leaves(eval_updates['batch_stats'])):
        np.testing.assert_array_equal(u, v)


def test_frozen_bn_never_updates_and_uses_initial_stats():
    frozen = get_model('inception10', bn='frozen')
    variables, x = init(frozen, batch=4)
    logits, updates = train_apply(frozen, variables, x)
    for u, v in zip(jax.tree_util.tree_leaves(variables['batch_stats']),
                    jax.tree_util.tree_leaves(updates['batch_stats'])):
        np.testing.assert_array_equal(u, v)
    # training and inference are the same function when BN is frozen (no dropout in inception10)
    np.testing.assert_allclose(logits, eval_apply(frozen, variables, x), rtol=1e-5, atol=1e-5)
    # ... and differ from ordinary BN in training mode (batch statistics)
    batch_logits, _ = train_apply(get_model('inception10'), variables, x)
    assert not np.allclose(logits, batch_logits, atol=1e-3)
    # scale and bias still receive gradients
    grads = jax.jit(jax.grad(lambda p: jnp.sum(train_apply(frozen, {**variables, 'params': p}, x)[0] ** 2)))(
        variables['params'])
    bn_grads = [g for path, g in jax.tree_util.tree_leaves_with_path(grads) if 'BatchNorm' in jax.tree_util.keystr(path)]
    assert bn_grads and any(float(jnp.abs(g).sum()) > 0 for g in bn_grads)


def test_unknown_names_raise():
    with pytest.raises(ValueError, match='lenet5'):
        get_model('lenet6')
    with pytest.raises(ValueError, match='relu'):
        get_model('lenet5', activation='swish2')
    with pytest.raises(ValueError, match='gemm'):
        get_model('lenet5', conv='cudnn')
    with pytest.raises(ValueError, match='bfloat16'):
        get_model('lenet5', dtype='float16')
    with pytest.raises(ValueError, match='frozen'):
        model = get_model('inception10', bn='sync')
        init(model)
    with pytest.raises(ValueError, match='unknown options'):
        get_model('lenet5', bn='frozen')


@pytest.mark.parametrize('activation', sorted(ACTIVATIONS))
def test_every_activation(activation):
    model = get_model('lenet5', activation=activation)
    variables, x = init(model)
    logits = eval_apply(model, variables, x)
    assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize('activation', ['sigmoid', 'relu', 'tanh', 'gelu', 'silu'])
def test_lenet_pools_before_monotone_activations(activation, monkeypatch):
    """LeNet-5 runs its bias and activation after the max pool where they commute (non-decreasing
    activations: lenet.POOL_BEFORE_ACTIVATION), on a quarter of the pixels, with the same outputs
    and gradients as in the usual order; gelu and silu (not monotone) keep the usual order."""
    from cifar_flax.models import lenet
    act, sizes = layers.get_activation(activation), []
    # records the size of what the activation is applied to, when traced
    monkeypatch.setattr(lenet, 'get_activation', lambda name: lambda y: sizes.append(y.size) or act(y))
    model = get_model('lenet5', activation=activation)
    variables, x = init(model)

    def run(pool_first):
        monkeypatch.setattr(lenet, 'POOL_BEFORE_ACTIVATION', pool_first)
        sizes.clear()
        loss = lambda p, x: jnp.sum(jnp.sin(model.apply({'params': p}, x)))
        result = jax.jit(jax.value_and_grad(loss, (0, 1)))(variables['params'], x)
        return result, sizes[0]  # the first conv's

    (pooled, first_size), (usual, usual_size) = run(True), run(False)
    assert usual_size == 2 * 28 * 28 * 6
    assert first_size == (2 * 14 * 14 * 6 if activation in layers.MONOTONE_ACTIVATIONS else usual_size)
    for a, b in zip(jax.tree_util.tree_leaves(pooled), jax.tree_util.tree_leaves(usual)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# Every conv configuration the networks use: (kernel, stride, padding, cin, cout, size).
CONV_CONFIGS = [
    (5, 1, 'VALID', 3, 6, 32),    # lenet5
    (3, 1, 'VALID', 3, 8, 32),    # alexnet8
    (3, 1, 'SAME', 8, 16, 5),     # alexnet8 / vgg16, odd size
    (3, 1, 'SAME', 4, 8, 2),      # vgg16 last group
    (1, 1, 'SAME', 8, 4, 8),      # inception 1x1
    (1, 2, 'SAME', 8, 4, 9),      # inception / resnet projection, odd size
    (1, 2, 'SAME', 8, 4, 8),
    (3, 2, 'SAME', 8, 16, 8),     # resnet downsampling
    # above HYBRID_GEMM_MAX_CHANNELS: the hybrid impl's native-convolution path
    (3, 1, 'SAME', 12, 16, 5),
    (3, 1, 'SAME', 12, 16, 9),    # >= WINOGRAD_MIN_SIZE, < WINOGRAD_KERNEL_GRAD_MIN_CHANNELS: native kernel gradient
    (3, 1, 'SAME', 32, 32, 9),    # Winograd kernel gradient, odd size
    (3, 2, 'SAME', 12, 16, 10),   # 5x5 output: above HYBRID_GEMM_MAX_MAP_PIXELS
    (3, 2, 'SAME', 12, 16, 8),    # 4x4 output: one im2col/matmul
    (3, 1, 'SAME', 12, 16, 4),    # the same, stride 1
    (5, 1, 'VALID', 12, 8, 9),
    (3, 1, 'VALID', 32, 48, 9),   # alexnet8 conv 2: Winograd kernel gradient of a VALID conv, odd size
    # >= WINOGRAD_MIN_CHANNELS and WINOGRAD_MIN_PIXELS (batch 2): Winograd forward and input gradient too
    (3, 1, 'SAME', 96, 128, 24),
    (3, 1, 'VALID', 96, 96, 25),  # odd output size
    (3, 2, 'SAME', 8, 16, 7),
    (5, 1, 'SAME', 4, 8, 8),      # inception 5x5
    (5, 1, 'SAME', 32, 8, 9),     # inception 5x5 of >= WINOGRAD_TILES_MIN_CHANNELS: Winograd F(4x4, 5x5), odd size
]


@pytest.mark.parametrize('k,s,padding,cin,cout,size', CONV_CONFIGS)
def test_conv_impls_agree(k, s, padding, cin, cout, size):
    kx, kk = jax.random.split(jax.random.key(k * 100 + s * 10 + size))
    x = jax.random.normal(kx, (2, size, size, cin))
    kernel = jax.random.normal(kk, (k, k, cin, cout)) / np.sqrt(k * k * cin)

    def loss(fn, x, kernel):
        y = fn(x, kernel, (s, s), padding)
        return jnp.sum(jnp.sin(y)), y

    (_, ref), ref_grads = jax.jit(jax.value_and_grad(lambda *a: loss(conv_xla, *a), (0, 1), has_aux=True))(x, kernel)
    chunked_hybrid = functools.partial(conv_hybrid, chunk=1)  # batch 2: two native-conv slices
    impls = (conv_gemm, conv_shifted_sum, conv_hybrid, chunked_hybrid) + ((layers.conv_onednn,) if onednn.available() else ())
    for fn in impls:
        (_, out), grads = jax.jit(jax.value_and_grad(lambda *a: loss(fn, *a), (0, 1), has_aux=True))(x, kernel)
        assert out.shape == ref.shape
        for a, b in zip((out, *grads), (ref, *ref_grads)):
            # Winograd's rounding errors scale with the array's largest entry (up to 7e-6 of
            # it on the CPU, for F(4x4, 5x5)): near-zero entries of a large gradient missed a
            # fixed 1e-4 on an H200, whose reference sums in another order.
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=max(1e-4, 3e-5 * float(np.abs(b).max())))


def test_conv_module_param_layout_matches_nn_conv():
    x = jnp.ones((1, 8, 8, 3))
    ours = jax.eval_shape(lambda: Conv(5, 3, impl='gemm').init(jax.random.key(0), x))
    ref = jax.eval_shape(lambda: nn.Conv(5, (3, 3)).init(jax.random.key(0), x))
    assert jax.tree_util.tree_map(lambda a: a.shape, ours) == jax.tree_util.tree_map(lambda a: a.shape, ref)


@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_batch_norm_matches_flax(train, dtype):
    x = (3 * jax.random.normal(jax.random.key(0), (4, 5, 5, 6)) + 2).astype(dtype)
    ours = layers.batch_norm(train, dtype)
    ref = nn.BatchNorm(use_running_average=not train, momentum=layers.BN_MOMENTUM, epsilon=layers.BN_EPSILON,
                       dtype=dtype, param_dtype=jnp.float32)
    variables = ref.init(jax.random.key(1), x)
    variables = jax.tree_util.tree_map(lambda v: v + 0.1 * jax.random.normal(jax.random.key(2), v.shape), variables)
    assert jax.tree_util.tree_structure(ours.init(jax.random.key(1), x)) == jax.tree_util.tree_structure(variables)

    def run(module, params, x):
        y, updates = module.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), (y, updates)
    grad = jax.jit(jax.grad(run, argnums=(1, 2), has_aux=True), static_argnums=0)
    (ours_grads, (ours_y, ours_stats)), (ref_grads, (ref_y, ref_stats)) = (
        grad(m, variables['params'], x) for m in (ours, ref))
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for a, b in zip(*(jax.tree_util.tree_leaves(t) for t in ((ours_y, ours_stats, ours_grads),
                                                              (ref_y, ref_stats, ref_grads)))):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize('train,frozen', [(True, False), (False, False), (True, True)])
def test_conv_batch_norm_is_batch_norm_of_the_biased_conv(train, frozen):
    class Reference(nn.Module):  # the conv's output with its bias, then BatchNorm
        @nn.compact
        def __call__(self, x):
            return layers.batch_norm(train, jnp.float32, frozen=frozen)(Conv(4, 3, name='Conv_0')(x))

    class Folded(nn.Module):
        @nn.compact
        def __call__(self, x):
            return layers.conv_batch_norm(Conv(4, 3, name='Conv_0'), layers.batch_norm(train, jnp.float32, frozen=frozen), x)

    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
    variables = Reference().init(jax.random.key(1), x)
    variables = jax.tree_util.tree_map(lambda v: v + 0.3 * jax.random.normal(jax.random.key(2), v.shape), variables)

    def run(module, params):
        y, updates = module.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
        return jnp.sum(jnp.sin(y)), (y, updates)
    grad = jax.jit(jax.grad(run, argnums=1, has_aux=True), static_argnums=0)
    (folded_grads, folded_out), (ref_grads, ref_out) = (grad(m, variables['params']) for m in (Folded(), Reference()))
    for a, b in zip(jax.tree_util.tree_leaves(folded_out), jax.tree_util.tree_leaves(ref_out)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    bias_grad = folded_grads['Conv_0'].pop('bias')
    ref_bias_grad = ref_grads['Conv_0'].pop('bias')
    if train and not frozen:  # the batch mean cancels the bias: its gradient is exactly zero
        np.testing.assert_array_equal(bias_grad, 0)
        np.testing.assert_allclose(ref_bias_grad, 0, atol=1e-4)  # rounding errors
    else:
        assert float(jnp.abs(bias_grad).max()) > 1e-3
        np.testing.assert_allclose(bias_grad, ref_bias_grad, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(folded_grads), jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_networks_agree_across_conv_impls(name):
    xla = get_model(name, conv='xla', pool='xla')
    variables, x = init(xla)
    ref = eval_apply(xla, variables, x)
    for conv in ('gemm', 'hybrid') + (('onednn',) if onednn.available() else ()):
        np.testing.assert_allclose(eval_apply(get_model(name, conv=conv, pool='slices'), variables, x), ref,
                                   rtol=1e-4, atol=1e-4)


def test_auto_picks_per_backend(monkeypatch):
    assert resolve_conv_impl('auto') == ('hybrid' if jax.default_backend() == 'cpu' else 'xla')
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    assert resolve_conv_impl('auto') == 'xla' and resolve_conv_impl('gemm') == 'gemm'


@pytest.mark.parametrize('window,stride,padding,size', [(2, 2, 'VALID', 8), (2, 2, 'SAME', 7), (2, 2, 'SAME', 1),
                                                        (3, 2, 'VALID', 30), (3, 2, 'VALID', 5),
                                                        (3, 1, 'SAME', 8), (3, 2, 'SAME', 8)])
@pytest.mark.parametrize('ties', [False, True])
def test_max_pool_impls_agree(window, stride, padding, size, ties):
    x = jax.random.normal(jax.random.key(size), (2, size, size, 3))
    if ties:  # ReLU outputs rounded: many windows hold their maximum more than once
        x = jnp.round(jax.nn.relu(x))
    weights = jnp.arange(1.0, 2 * size * size * 3 + 1)  # a distinct gradient per output: shows where each goes

    def f(impl):
        def loss(x):
            y = max_pool(x, window, stride, padding, impl=impl)
            return jnp.sum(jnp.cos(y) * weights[:y.size].reshape(y.shape))
        return jax.value_and_grad(loss)

    (v, g), (rv, rg) = jax.jit(f('slices'))(x), jax.jit(f('xla'))(x)
    np.testing.assert_allclose(v, rv, rtol=1e-5)
    np.testing.assert_allclose(g, rg, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the fusion barriers are CPU-only')
@pytest.mark.parametrize('window,stride,barriers', [(2, 2, 2), (3, 2, 0)])
def test_tiling_max_pool_backward_reads_argmax_and_gradient_written_once(window, stride, barriers):
    """Where windows tile the input, the 'slices' pool writes its argmax in the forward and
    its incoming gradient before spreading it: two fusion barriers (conditionals) in the
    compiled gradient. Without them XLA:CPU recomputed both once per window pixel (LeNet-5's
    first pool). Overlapping windows keep none."""
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    loss = lambda x: jnp.sum(jnp.sin(max_pool(jnp.sin(x), window, stride, impl='slices')))
    assert jax.jit(jax.grad(loss)).lower(x).compile().as_text().count(' conditional(') == barriers


@pytest.mark.parametrize('impl', ['slices', 'xla'])
@pytest.mark.parametrize('size', [8, 7])
def test_strided_pool_is_subsampled_same_pool(impl, size):
    """Inception's pool branch pools at the stride of its 1x1 conv instead of pooling at
    stride 1 and letting the conv subsample: the outputs must be the same."""
    x = jax.random.normal(jax.random.key(size), (2, size, size, 3))
    strided = max_pool(x, 3, 2, padding=((1, 1), (1, 1)), impl=impl)
    np.testing.assert_array_equal(strided, max_pool(x, 3, 1, padding='SAME', impl=impl)[:, ::2, ::2])
    np.testing.assert_array_equal(strided, conv_hybrid(max_pool(x, 3, 1, padding='SAME', impl=impl),
                                                       jnp.eye(3)[None, None], (2, 2), 'SAME'))


@pytest.mark.parametrize('stride', [1, 2])
def test_hybrid_gradients_inside_scan(stride):
    """train.fit runs steps in lax.scan; the custom VJP must give the same gradients there."""
    # > HYBRID_GEMM_MAX_CHANNELS; stride 2: a 5x5 output, > HYBRID_GEMM_MAX_MAP_PIXELS
    xs = jax.random.normal(jax.random.key(0), (2, 4, 10, 10, 12))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 12, 5)) / 8

    def summed_grads(fn):
        def body(total, x):
            return total + jax.grad(lambda k: jnp.sum(jnp.sin(fn(x, k, (stride, stride), 'SAME'))))(kernel), None
        return jax.jit(lambda: jax.lax.scan(body, jnp.zeros_like(kernel), xs)[0])()

    np.testing.assert_allclose(summed_grads(functools.partial(conv_hybrid, chunk=3)), summed_grads(conv_xla),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('size,stride,native', [(4, 1, False), (5, 1, True), (8, 2, False), (10, 2, True)])
def test_hybrid_small_maps_are_one_matmul(size, stride, native):
    """Output maps of at most HYBRID_GEMM_MAX_MAP_PIXELS (16: 4x4) skip XLA's convolution."""
    x, kernel = jnp.ones((2, size, size, 12)), jnp.ones((3, 3, 12, 16))
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda x, k: jnp.sum(conv_hybrid(x, k, (stride, stride))), (0, 1)))(x, kernel))
    assert ('conv_general_dilated' in jaxpr) == native


def test_hybrid_small_maps_take_winograd_where_it_applies(monkeypatch):
    """A 4x4 map goes through Winograd tiles when winograd_conv_applies (enough pixels and
    channels), else through one im2col matmul."""
    x, kernel = jax.random.normal(jax.random.key(0), (2, 4, 4, 12)), jax.random.normal(jax.random.key(1), (3, 3, 12, 16))
    calls = []
    for name in ('conv_gemm', 'conv_winograd'):
        fn = getattr(layers, name)
        monkeypatch.setattr(layers, name, lambda *a, fn=fn, name=name, **k: calls.append(name) or fn(*a, **k))
    conv_hybrid(x, kernel)
    assert calls == ['conv_gemm'] and not winograd_conv_applies(x.shape, kernel.shape, (1, 1), 'SAME')
    monkeypatch.setattr(layers, 'WINOGRAD_MIN_CHANNELS', 1)
    monkeypatch.setattr(layers, 'WINOGRAD_MIN_PIXELS', 1)
    calls.clear()
    np.testing.assert_allclose(conv_hybrid(x, kernel), conv_xla(x, kernel), rtol=1e-4, atol=1e-4)
    assert calls == ['conv_winograd']


@pytest.mark.parametrize('shape,dtype,images', [
    ((128, 32, 32, 64), jnp.float32, 8),     # ResNet-18 stage 1: 256 KiB an image
    ((128, 16, 16, 128), jnp.float32, 16),
    ((128, 8, 8, 256), jnp.float32, 32),     # capped at HYBRID_CONV_CHUNK
    ((128, 32, 32, 64), jnp.bfloat16, 16),   # half the bytes, twice the images
    ((4, 512, 512, 64), jnp.float32, 1),     # never fewer than one
])
def test_hybrid_slice_images(shape, dtype, images):
    assert layers._slice_images(jax.ShapeDtypeStruct(shape, dtype)) == images


def test_hybrid_default_slices_by_bytes(monkeypatch):
    """With a tiny HYBRID_SLICE_BYTES the default slicing cuts a batch of 3 into slices of 2 and 1
    images, and must still match XLA's convolution and gradients."""
    x = jax.random.normal(jax.random.key(0), (3, 6, 6, 12))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 12, 5)) / 6
    monkeypatch.setattr(layers, 'HYBRID_SLICE_BYTES', 2 * 6 * 6 * 12 * 4)
    assert layers._slice_images(x) == 2

    def value_and_grads(fn):
        return jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(jnp.sin(fn(x, k, (1, 1), 'SAME'))), (0, 1)))(x, kernel)

    for got, want in zip(jax.tree.leaves(value_and_grads(conv_hybrid)), jax.tree.leaves(value_and_grads(conv_xla))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('shape,padding', [
    ((2, 8, 8, 3, 4), 'SAME'), ((3, 9, 12, 5, 2), 'SAME'), ((1, 1, 3, 2, 2), 'SAME'), ((2, 2, 2, 4, 1), 'SAME'),
    ((2, 8, 8, 3, 4), 'VALID'), ((3, 9, 12, 5, 2), 'VALID'), ((1, 3, 4, 2, 2), 'VALID'), ((2, 14, 14, 4, 3), 'VALID')])
def test_winograd_conv_matches_native(shape, padding):
    n, h, w, cin, cout = shape
    kx, kk = jax.random.split(jax.random.key(h * w))
    x = jax.random.normal(kx, (n, h, w, cin))
    kernel = jax.random.normal(kk, (3, 3, cin, cout)) / np.sqrt(9 * cin)
    conv = lambda fn: lambda x, k: fn(x, k, (1, 1), padding)
    loss = lambda fn: jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(jnp.sin(conv(fn)(x, k))), (0, 1)))(x, kernel)
    np.testing.assert_allclose(conv(conv_winograd)(x, kernel), conv(conv_xla)(x, kernel), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(loss(conv_winograd)), jax.tree_util.tree_leaves(loss(conv_xla))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('k,padding,cin,cout,hw,block', [
    (5, 'VALID', 3, 6, (32, 32), None),   # lenet5 conv1: block 4 divides the 28 columns
    (5, 'VALID', 6, 16, (14, 14), None),  # lenet5 conv2: block 5
    (3, 'SAME', 3, 64, (9, 7), None),     # first layers, odd non-square map
    (3, 'VALID', 3, 8, (6, 11), 4),       # 9 columns in blocks of 4: padded, then sliced off
    (5, 'SAME', 4, 8, (7, 7), 16),        # one block wider than the map
    (3, 'SAME', 2, 3, (6, 6), 1),         # block 1 is im2col
])
def test_toeplitz_conv_matches_native(k, padding, cin, cout, hw, block):
    kx, kk = jax.random.split(jax.random.key(k * cin + cout))
    x = jax.random.normal(kx, (3, *hw, cin))
    kernels = jax.random.normal(kk, (3, k, k, cin, cout)) / np.sqrt(k * k * cin)
    toeplitz = functools.partial(conv_toeplitz, padding=padding, block=block)
    native = functools.partial(conv_xla, padding=padding)
    loss = lambda fn: jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(jnp.sin(fn(x, k))), (0, 1)))(x, kernels[0])
    np.testing.assert_allclose(toeplitz(x, kernels[0]), native(x, kernels[0]), rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.tree_util.tree_leaves(loss(toeplitz)), jax.tree_util.tree_leaves(loss(native))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # sweeps vmap over members' kernels (and inputs)
    members = jax.jit(jax.vmap(lambda x, k: toeplitz(x[None], k)))(x, kernels)
    np.testing.assert_allclose(members, jax.vmap(lambda x, k: native(x[None], k))(x, kernels), rtol=1e-4, atol=1e-4)
    member_grads = lambda fn: jax.jit(jax.vmap(jax.grad(lambda x, k: jnp.sum(jnp.sin(fn(x[None], k))), (0, 1))))(x, kernels)
    for a, b in zip(member_grads(toeplitz), member_grads(native)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_toeplitz_block_rule():
    assert toeplitz_block(28, 6) == 4 and toeplitz_block(10, 16) == 5   # lenet5
    assert toeplitz_block(32, 64) == 2 and toeplitz_block(30, 96) == 2  # vgg16/resnet18, alexnet8
    assert toeplitz_block(3, 6) == 3 and toeplitz_block(13, 6) == 4     # narrow map; no divisor near 4
    with pytest.raises(ValueError, match='stride 1'):
        conv_toeplitz(jnp.ones((1, 8, 8, 2)), jnp.ones((3, 3, 2, 2)), (2, 2))


def test_hybrid_bfloat16_kernel_grad_as_accurate_as_native():
    """The Winograd kernel gradient sums over tiles; in bfloat16 it must not lose much more
    than XLA's own bfloat16 convolution (both against the float32 gradient)."""
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 32))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 32, 32)) / 17

    def kernel_grad(fn, dtype):
        loss = lambda k: jnp.sum(jnp.sin(fn(x.astype(dtype), k.astype(dtype)).astype(jnp.float32)))
        return jax.jit(jax.grad(loss))(kernel)

    ref = kernel_grad(conv_xla, jnp.float32)
    error = lambda fn: float(jnp.abs(kernel_grad(fn, jnp.bfloat16) - ref).max() / jnp.abs(ref).max())
    assert error(conv_hybrid) < 2 * error(conv_xla)


def test_winograd_only_where_it_applies():
    with pytest.raises(ValueError, match='3x3'):
        conv_winograd(jnp.ones((1, 8, 8, 2)), jnp.ones((3, 3, 2, 2)), (2, 2))
    size, wide = WINOGRAD_MIN_SIZE, layers.WINOGRAD_KERNEL_GRAD_MIN_CHANNELS
    assert winograd_kernel_grad_applies((size, size + 3), (3, 3, wide, wide), (1, 1), 'SAME')
    assert not winograd_kernel_grad_applies((size, size + 3), (3, 3, wide - 1, wide), (1, 1), 'SAME')
    assert not winograd_kernel_grad_applies((size, size + 3), (3, 3, wide, wide - 1), (1, 1), 'SAME')
    assert not winograd_kernel_grad_applies((size - 1, size), (3, 3, wide, wide), (1, 1), 'SAME')
    assert not winograd_kernel_grad_applies((size, size), (3, 3, wide, wide), (2, 2), 'SAME')
    assert winograd_kernel_grad_applies((size, size), (3, 3, wide, wide), (1, 1), 'VALID')
    assert not winograd_kernel_grad_applies((size, size), (5, 5, wide, wide), (1, 1), 'SAME')
    channels, pixels = layers.WINOGRAD_MIN_CHANNELS, layers.WINOGRAD_MIN_PIXELS
    assert winograd_conv_applies((pixels // 16, 4, 4, channels), (3, 3, channels, channels), (1, 1), 'SAME')
    assert winograd_conv_applies((pixels // 16, 6, 6, channels), (3, 3, channels, channels), (1, 1), 'VALID')
    assert not winograd_conv_applies((pixels // 16 - 1, 4, 4, channels), (3, 3, channels, channels), (1, 1), 'SAME')
    assert not winograd_conv_applies((pixels // 16, 4, 4, channels - 1), (3, 3, channels - 1, channels), (1, 1), 'SAME')
    assert not winograd_conv_applies((pixels // 16, 4, 4, channels), (3, 3, channels, channels - 1), (1, 1), 'SAME')
    assert not winograd_conv_applies((pixels // 16, 8, 8, channels), (3, 3, channels, channels), (2, 2), 'SAME')
    assert not winograd_conv_applies((pixels // 16, 8, 8, channels), (5, 5, channels, channels), (1, 1), 'SAME')
    # WINOGRAD_MIN_TILE_USE: a 5x5 output takes 3x3 tiles (25 of 36 outputs real), a 7x7 one 4x4 (49 of 64)
    assert not winograd_conv_applies((pixels // 16, 5, 5, channels), (3, 3, channels, channels), (1, 1), 'SAME')
    # a 7x7 input VALID: a 5x5 output
    assert not winograd_conv_applies((pixels // 16, 7, 7, channels), (3, 3, channels, channels), (1, 1), 'VALID')
    assert winograd_conv_applies((pixels // 16, 7, 7, channels), (3, 3, channels, channels), (1, 1), 'SAME')


@pytest.mark.parametrize('tile,size', [(2, 3), (4, 3), (2, 5), (4, 5)])
def test_winograd_matrices_compute_the_correlation(tile, size):
    at, g, bt = layers.winograd_matrices(tile, size)
    assert at.shape == (tile, tile + size - 1) and g.shape == (tile + size - 1, size) and bt.shape == (tile + size - 1,) * 2
    rng = np.random.default_rng(tile * size)
    for _ in range(3):
        d, f = rng.normal(size=tile + size - 1), rng.normal(size=size)
        want = np.array([d[i:i + size] @ f for i in range(tile)])
        np.testing.assert_allclose(at @ ((g @ f) * (bt @ d)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape', [(2, 8, 8, 12, 8), (3, 7, 9, 10, 4), (1, 3, 2, 9, 3), (2, 16, 16, 16, 16)])
@pytest.mark.parametrize('tile', [4, 2])
def test_winograd_tiles_conv_matches_native(shape, tile):
    """F(tile x tile, 5x5): outputs, input and kernel gradients (the custom VJP) against XLA's conv,
    on maps that are not whole tiles and one smaller than the kernel."""
    n, h, w, cin, cout = shape
    kx, kk = jax.random.split(jax.random.key(h * w + tile))
    x = jax.random.normal(kx, (n, h, w, cin))
    kernel = jax.random.normal(kk, (5, 5, cin, cout)) / np.sqrt(25 * cin)
    ours = functools.partial(layers.conv_winograd_tiles, tile=tile)
    loss = lambda fn: jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(jnp.sin(fn(x, k))), (0, 1)))(x, kernel)
    # F(4x4, 5x5)'s fractional transforms round more than the direct sums: errors of ~1e-5 of an
    # array's largest entry (the kernel gradient sums 512 pixels here), not of each entry
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5 * float(np.abs(b).max()))
    close(ours(x, kernel), conv_xla(x, kernel))
    for a, b in zip(jax.tree_util.tree_leaves(loss(ours)), jax.tree_util.tree_leaves(loss(conv_xla))):
        close(a, b)


def test_winograd_tiles_only_where_they_apply():
    for kernel, strides, padding in [((4, 4, 2, 2), (1, 1), 'SAME'), ((5, 5, 2, 2), (2, 2), 'SAME'),
                                     ((5, 5, 2, 2), (1, 1), 'VALID'), ((5, 3, 2, 2), (1, 1), 'SAME')]:
        with pytest.raises(ValueError, match='odd square'):
            layers.conv_winograd_tiles(jnp.ones((1, 8, 8, 2)), jnp.ones(kernel), strides, padding)
    wide = layers.WINOGRAD_TILES_MIN_CHANNELS
    assert layers.winograd_tiles_apply((2, 8, 8, wide), (5, 5, wide, 4), (1, 1), 'SAME')
    assert layers.winograd_tiles_apply((2, 8, 8, wide), (5, 5, wide, 4), (1, 1), 'same')
    assert not layers.winograd_tiles_apply((2, 8, 8, wide - 1), (5, 5, wide - 1, 4), (1, 1), 'SAME')
    assert not layers.winograd_tiles_apply((2, 8, 8, wide), (5, 5, wide, 4), (2, 2), 'SAME')
    assert not layers.winograd_tiles_apply((2, 8, 8, wide), (5, 5, wide, 4), (1, 1), 'VALID')
    assert not layers.winograd_tiles_apply((2, 8, 8, wide), (3, 3, wide, 4), (1, 1), 'SAME')


def test_winograd_tiles_bfloat16_as_accurate_as_native():
    """F(4x4, 5x5) runs in float32 inside; in bfloat16 the hybrid conv's 5x5 must not lose much
    more than XLA's own bfloat16 convolution (output and both gradients, against float32)."""
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 32))
    kernel = jax.random.normal(jax.random.key(1), (5, 5, 32, 32)) / 28
    assert layers.winograd_tiles_apply(x.shape, kernel.shape, (1, 1), 'SAME')

    def out_and_grads(fn, dtype):
        conv = lambda x, k: fn(x.astype(dtype), k.astype(dtype)).astype(jnp.float32)
        return jax.jit(lambda x, k: (conv(x, k), jax.grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k))), (0, 1))(x, k)))(
            x, kernel)

    ref = jax.tree_util.tree_leaves(out_and_grads(conv_xla, jnp.float32))
    for ours, xla, want in zip(jax.tree_util.tree_leaves(out_and_grads(conv_hybrid, jnp.bfloat16)),
                               jax.tree_util.tree_leaves(out_and_grads(conv_xla, jnp.bfloat16)), ref):
        error = lambda got: float(jnp.abs(got - want).max() / jnp.abs(want).max())
        assert error(ours) < 2 * error(xla)


@pytest.mark.parametrize('shape,padding', [((3, 9, 12, 5, 4), 'SAME'), ((2, 14, 14, 4, 3), 'VALID'),
                                           ((2, 7, 6, 3, 6), 'VALID')])
def test_hybrid_winograd_conv_matches_native(shape, padding, monkeypatch):
    """The hybrid conv's Winograd forward and input gradient (the latter on the kernel's own tiles,
    permuted, each matmul contracting the tile's output channels) and its Winograd kernel gradient."""
    monkeypatch.setattr(layers, 'WINOGRAD_MIN_CHANNELS', 1)
    monkeypatch.setattr(layers, 'WINOGRAD_MIN_PIXELS', 1)
    monkeypatch.setattr(layers, 'WINOGRAD_MIN_TILE_USE', 0)
    monkeypatch.setattr(layers, 'WINOGRAD_KERNEL_GRAD_MIN_CHANNELS', 1)
    n, h, w, cin, cout = shape
    kx, kk = jax.random.split(jax.random.key(h * w + cin))
    x = jax.random.normal(kx, (n, h, w, cin))
    kernel = jax.random.normal(kk, (3, 3, cin, cout)) / np.sqrt(9 * cin)
    assert winograd_conv_applies(x.shape, kernel.shape, (1, 1), padding)
    assert winograd_kernel_grad_applies((h, w), kernel.shape, (1, 1), padding)
    loss = lambda fn: jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(jnp.sin(fn(x, k, (1, 1), padding))), (0, 1)))
    for ours, want in zip(jax.tree.leaves(loss(conv_hybrid)(x, kernel)), jax.tree.leaves(loss(conv_xla)(x, kernel))):
        np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4)


def test_winograd_kernel_transforms():
    """G k G^T per tile and its transpose G^T d G, written as slice sums, against einsums."""
    g = np.asarray(layers.WINOGRAD_G)
    kernel = np.random.default_rng(0).normal(size=(3, 3, 4, 5))
    tiles = np.random.default_rng(1).normal(size=(16, 4, 5))
    np.testing.assert_allclose(jnp.stack(layers._winograd_kernel_tiles(jnp.asarray(kernel, jnp.float32))),
                               np.einsum('ri,ijck,sj->rsck', g, kernel, g).reshape(16, 4, 5), rtol=1e-5, atol=1e-6)
    want = np.einsum('ri,rsck,sj->ijck', g, tiles.reshape(4, 4, 4, 5), g)
    for given in (jnp.asarray(tiles, jnp.float32), list(jnp.asarray(tiles, jnp.float32))):  # a stack or a list
        np.testing.assert_allclose(layers._winograd_untile_kernel(given), want, rtol=1e-5, atol=1e-6)


def test_hybrid_winograd_forward_bfloat16_as_accurate_as_native(monkeypatch):
    """The Winograd forward and input gradient add transformed tiles; in bfloat16 they must not
    lose much more than XLA's own bfloat16 convolution (both against float32)."""
    monkeypatch.setattr(layers, 'WINOGRAD_MIN_CHANNELS', 1)
    monkeypatch.setattr(layers, 'WINOGRAD_MIN_PIXELS', 1)
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 32))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 32, 32)) / 17
    assert winograd_conv_applies(x.shape, kernel.shape, (1, 1), 'SAME')

    def out_and_input_grad(fn, dtype):
        conv = lambda x: fn(x.astype(dtype), kernel.astype(dtype)).astype(jnp.float32)
        return jax.jit(lambda x: (conv(x), jax.grad(lambda x: jnp.sum(jnp.sin(conv(x))))(x)))(x)

    ref = out_and_input_grad(conv_xla, jnp.float32)
    for ours, xla, want in zip(out_and_input_grad(conv_hybrid, jnp.bfloat16),
                               out_and_input_grad(conv_xla, jnp.bfloat16), ref):
        error = lambda got: float(jnp.abs(got - want).max() / jnp.abs(want).max())
        assert error(ours) < 2 * error(xla)


# 1x1 kernels: the kernel gradient as g^T @ x on the CPU (_pointwise_matmul)
@pytest.mark.parametrize('k,stride,winograd', [(3, 1, False), (3, 2, False), (3, 1, True), (1, 1, False), (1, 2, False),
                                               (5, 1, True)])
@pytest.mark.parametrize('in_axes', [(0, 0), (0, None), (None, 0)])
def test_hybrid_conv_under_vmap(in_axes, k, stride, winograd, monkeypatch):
    """Sweeps vmap the train step over members; the hybrid conv's own vmap rule (one
    convolution per member, or folded into images/channels) must match jax's, and so must its
    Winograd forward and input gradient (matmuls, vmapped by jax), and 5x5s' Winograd F(4x4, 5x5)."""
    if winograd:
        monkeypatch.setattr(layers, 'WINOGRAD_MIN_CHANNELS', 1)
        monkeypatch.setattr(layers, 'WINOGRAD_MIN_PIXELS', 1)
        monkeypatch.setattr(layers, 'WINOGRAD_TILES_MIN_CHANNELS', 1)
    kx, kk = jax.random.split(jax.random.key(3))
    xs = jax.random.normal(kx, (3, 4, 9, 9, 12))  # > HYBRID_GEMM_MAX_CHANNELS: native path (stride 1: Winograd dk)
    kernels = jax.random.normal(kk, (3, k, k, 12, 5)) / 10
    x_arg = xs if in_axes[0] == 0 else xs[0]
    k_arg = kernels if in_axes[1] == 0 else kernels[0]

    def value_and_grads(fn):
        def member(x, k):
            loss = lambda x, k: jnp.sum(jnp.sin(fn(x, k, (stride, stride), 'SAME')))
            return jax.value_and_grad(loss, (0, 1))(x, k)
        return jax.jit(jax.vmap(member, in_axes=in_axes))(x_arg, k_arg)

    ours = value_and_grads(functools.partial(conv_hybrid, chunk=2))
    ref = value_and_grads(conv_xla)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref)):
        # F(4x4, 5x5): errors of ~1e-5 of the largest entry (test_winograd_tiles_conv_matches_native)
        atol = 3e-5 * float(np.abs(b).max()) if k == 5 else 1e-4
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol)


# How many conditionals a fusion barrier compiles to: one on the CPU, none elsewhere (on a
# GPU a conditional's predicate would sync with the host; materialize is the identity).
BARRIER = int(jax.default_backend() == 'cpu')


@pytest.mark.parametrize('batched', [False, True])
def test_materialize_is_an_identity_xla_cannot_fuse_through(batched):
    """materialize(x) == x in value and gradient, alone and under vmap (sweeps); jitted on the
    CPU, it compiles to a conditional (the fusion barrier), also when vmapped (no select of
    both); elsewhere to nothing."""
    x = jax.random.normal(jax.random.key(0), (3, 2, 4, 4, 5) if batched else (2, 4, 4, 5))
    w = jax.random.normal(jax.random.key(1), x.shape[-1:])
    loss = lambda x: jnp.sum(jnp.sin(layers.materialize(jnp.maximum(x, 0)) * w))
    ref_loss = lambda x: jnp.sum(jnp.sin(jnp.maximum(x, 0) * w))
    value_and_grad = jax.value_and_grad(loss)
    ref_value_and_grad = jax.value_and_grad(ref_loss)
    if batched:
        value_and_grad, ref_value_and_grad = jax.vmap(value_and_grad), jax.vmap(ref_value_and_grad)
    ours, ref = jax.jit(value_and_grad)(x), jax.jit(ref_value_and_grad)(x)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    hlo = jax.jit(value_and_grad).lower(x).compile().as_text()
    assert hlo.count(' conditional(') == BARRIER * 1  # the forward only: this gradient is small


def test_materialize_under_vmap_keeps_a_nan_member_to_itself():
    """The vmapped barrier predicates on the batched array's first element; a NaN there
    (one diverging sweep member) must not reach the other members."""
    x = jnp.stack([jnp.full((4, 4), jnp.nan), jnp.arange(16.0).reshape(4, 4)])
    y = jax.jit(jax.vmap(layers.materialize))(x)
    assert np.isnan(y[0]).all()
    np.testing.assert_array_equal(y[1], x[1])


def test_materialize_rejects_integer_arrays():
    # XLA folds the barrier's predicate (x == x) on integers: it would silently do nothing
    with pytest.raises(TypeError, match='floating-point'):
        layers.materialize(jnp.zeros((2, 3), jnp.int8))


def test_materialize_writes_large_gradients_once_too(monkeypatch):
    """Gradients of at least MATERIALIZE_GRAD_BYTES go through the barrier on the way back
    as well (on the CPU): a second conditional, same values."""
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 5))
    loss = lambda x: jnp.sum(jnp.sin(layers.materialize(jnp.maximum(x, 0)) * 2.0))
    small = jax.jit(jax.grad(loss)).lower(x).compile()
    monkeypatch.setattr(layers, 'MATERIALIZE_GRAD_BYTES', x.size * x.dtype.itemsize)
    large = jax.jit(jax.grad(loss)).lower(x).compile()
    assert small.as_text().count(' conditional(') == BARRIER * 1
    assert large.as_text().count(' conditional(') == BARRIER * 2
    np.testing.assert_allclose(large(x), small(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('batched', [False, True])
@pytest.mark.parametrize('activation,with_bias', [('sigmoid', True), ('tanh', True), ('relu', False)])
def test_bias_activation_is_activation_of_the_biased_map(activation, with_bias, batched):
    """bias_activation(y, b, act) == act(y + b) in value and both gradients, alone and under
    vmap (sweeps); on the CPU its incoming gradient passes a fusion barrier (a conditional)."""
    act = ACTIVATIONS[activation]
    y = jax.random.normal(jax.random.key(0), (3, 2, 5, 7, 6) if batched else (2, 5, 7, 6))
    b = jax.random.normal(jax.random.key(1), y.shape[:1] + (6,) if batched else (6,))
    w = jax.random.normal(jax.random.key(2), y.shape[-3:])

    def loss(fn):
        def f(y, b):
            return jnp.sum(jnp.sin(fn(y, b if with_bias else None) * w))
        f = jax.value_and_grad(f, argnums=(0, 1))
        return jax.jit(jax.vmap(f) if batched else f)

    ours = loss(lambda y, b: layers.bias_activation(y, b, act))
    ref = loss(lambda y, b: act(y if b is None else y + b))
    for a, r in zip(jax.tree_util.tree_leaves(ours(y, b)), jax.tree_util.tree_leaves(ref(y, b))):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)
    if jax.default_backend() == 'cpu':
        assert ours.lower(y, b).compile().as_text().count(' conditional(') == 1


@pytest.mark.parametrize('batched', [False, True])
@pytest.mark.parametrize('train', [True, False])
def test_batch_norm_activation_on_rows_matches_the_4d_map(train, batched, monkeypatch):
    """BatchNorm(x, activation=relu) on a 16-channel map (on the CPU: the row view, channelwise)
    gives the same output, gradients and running statistics as relu(BatchNorm(x)) computed on the
    4-D map (ROW_VIEW_MAX_CHANNELS=0), alone and under vmap (sweeps)."""
    x = jax.random.normal(jax.random.key(0), (3, 4, 6, 5, 16) if batched else (4, 6, 5, 16)) + 0.3
    w = jax.random.normal(jax.random.key(1), x.shape[-3:])
    norm = layers.batch_norm(train, jnp.float32)
    variables = norm.init(jax.random.key(2), x[0] if batched else x)
    variables = jax.tree_util.tree_map(lambda v: v + 0.2, variables)  # a nonzero shift everywhere

    def loss(variables, x, fused):
        if fused:
            y, updates = norm.apply(variables, x, activation=nn.relu, mutable=['batch_stats'])
        else:
            y, updates = norm.apply(variables, x, mutable=['batch_stats'])
            y = nn.relu(y)
        return jnp.sum(jnp.sin(y * w)), updates

    def run(fused):
        f = jax.value_and_grad(functools.partial(loss, fused=fused), argnums=(0, 1), has_aux=True)
        return jax.jit(jax.vmap(f, in_axes=(None, 0)) if batched else f)(variables, x)

    rows = run(fused=True)
    monkeypatch.setattr(layers, 'ROW_VIEW_MAX_CHANNELS', 0)
    ref = run(fused=True)
    plain = run(fused=False)
    for other in (ref, plain):
        for a, r in zip(jax.tree_util.tree_leaves(rows), jax.tree_util.tree_leaves(other)):
            np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5)


def test_conv_activation_matches_activation_of_conv():
    """Conv(activation=act) is act(Conv(x)) with the same parameters, in float32 and bfloat16."""
    x = jax.random.normal(jax.random.key(0), (2, 14, 14, 6))
    plain = Conv(16, 5, padding='VALID')
    variables = jax.jit(plain.init)(jax.random.key(1), x)
    variables = jax.tree_util.tree_map(lambda p: p + 0.1, variables)  # a nonzero bias
    for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)):
        fused = Conv(16, 5, padding='VALID', activation=nn.sigmoid, dtype=dtype)
        ref = jax.jit(lambda v, x: nn.sigmoid(Conv(16, 5, padding='VALID', dtype=dtype).apply(v, x)))(variables, x)
        out = jax.jit(fused.apply)(variables, x)
        assert out.dtype == dtype
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol)
