"""Throughput benchmark: training and inference images/second of one network.

    python -m cifar_flax.bench --model vgg16 --batch 128 [--steps 10] [--windows 5]
        [--dtype float32|bfloat16] [--devices N] [--conv auto|xla|gemm|hybrid|onednn]
        [--mode step|scan] [--data SPEC] [--peak]

prints one JSON line. Training counts real optimiser steps, as `train.fit` runs
them (the seed protocol's Adam, forward + backward + update, BatchNorm in
training mode, dropout on) on real CIFAR-10 batches from ``--data``. Mode
'step' calls the jitted train_step once per batch (like Keras/PyTorch loops);
mode 'scan' runs ``steps`` batches in one `lax.scan` call, as `fit` does.
Timing starts after compilation and warm-up; each of ``windows`` windows runs
``steps`` steps and ends with block_until_ready; the median window is reported.
Inference times `model.apply(train=False)` on the same batches.

Model FLOPs come from XLA's cost analysis of one lowered train step and one
forward pass of the same network with XLA's own convolution (`conv='xla'`: the
other implementations loop over slices, and a loop's body is counted once), so
they count the model's arithmetic, not the implementation's (`onednn` in the record: whether
oneDNN's convolutions ran, see models/onednn.py); ``--peak`` also measures a float32 4096x4096 matmul so that
achieved FLOP/s can be reported as a fraction of what this machine's matmul reaches.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

PEAK_MATMUL_SIZE = 4096
MODES = ('step', 'scan')
DEFAULT_SCAN_STEPS = 50


def parse_args(argv=None) -> argparse.Namespace:
    from cifar_flax.config import DTYPES, MATMUL_PRECISIONS
    from cifar_flax.models import CONV_IMPLS, MODEL_NAMES, POOL_IMPLS
    p = argparse.ArgumentParser(prog='python -m cifar_flax.bench', description=__doc__.split('\n\n')[0])
    p.add_argument('--model', required=True, help=f"one of {', '.join(MODEL_NAMES)} (or googlenet)")
    p.add_argument('--batch', type=int, default=128, help='global batch size')
    p.add_argument('--steps', type=int, default=0,
                   help='train steps per timed window (0: about --window-seconds per window in step '
                        f'mode, {DEFAULT_SCAN_STEPS} in scan mode)')
    p.add_argument('--window-seconds', type=float, default=2.0)
    p.add_argument('--windows', type=int, default=5, help='timed windows (the median is reported)')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps after compilation')
    p.add_argument('--dtype', default='float32', choices=DTYPES)
    p.add_argument('--matmul-precision', default='default', choices=MATMUL_PRECISIONS,
                   help="jax.default_matmul_precision for the programs; 'bfloat16' on the CPU: oneDNN's "
                        'convolutions multiply float32 operands in bfloat16 (AMX where the CPU has it)')
    p.add_argument('--conv', default='auto', choices=CONV_IMPLS)
    p.add_argument('--pool', default='auto', choices=POOL_IMPLS)
    p.add_argument('--devices', type=int, default=1,
                   help='data-parallel devices (on CPU: simulated host devices sharing the cores)')
    p.add_argument('--mode', default='step', choices=MODES)
    p.add_argument('--data', default=None, help='data spec for cifar_flax.data.load_cifar10 '
                   '(default: $CIFAR_FLAX_DATA or tfds)')
    p.add_argument('--peak', action='store_true', help='also measure the float32 matmul peak')
    p.add_argument('--no-eval', dest='eval', action='store_false', help='skip the inference timing')
    args = p.parse_args(argv)
    if args.steps < 0:
        p.error('--steps must be non-negative')
    for name in ('batch', 'windows', 'devices'):
        if getattr(args, name) < 1:
            p.error(f'--{name} must be positive')
    if args.batch % args.devices:
        p.error(f'--batch {args.batch} is not divisible by --devices {args.devices}')
    return args


def _set_host_devices(count: int) -> None:
    """Simulated CPU devices must be requested before jax initialises its backend."""
    if count > 1:
        flag = f'--xla_force_host_platform_device_count={count}'
        os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + flag).strip()


def _median_rate(run, items_per_call: int, windows: int) -> tuple[float, float]:
    """(median items/second, median cores busy) over ``windows`` timed calls of ``run``
    (which must block). Cores busy = this process's CPU seconds per wall second: on a
    shared CPU it shows how much of the machine the measurement actually got."""
    rates, cores = [], []
    for _ in range(windows):
        start, cpu_start = time.perf_counter(), time.process_time()
        run()
        wall = time.perf_counter() - start
        rates.append(items_per_call / wall)
        cores.append((time.process_time() - cpu_start) / wall)
    return statistics.median(rates), statistics.median(cores)


def interleaved_medians(variants: dict, args: tuple, reps: int) -> dict[str, float]:
    """Median seconds of each jitted variant called on ``args`` (after one warm-up call each),
    the variants called in turn ``reps`` times: the machine's swings then hit all alike."""
    import jax

    for fn in variants.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _flops(lowered) -> float | None:
    analysis = lowered.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get('flops')
    return float(flops) if flops and flops > 0 else None


def model_flops(config, tx, batch: int) -> tuple[float | None, float | None]:
    """(train step, forward pass) FLOPs per image of ``config``'s network, counted on the
    lowered (unoptimised, not compiled) programs of the plain-XLA-convolution variant.

    Lowered for the CPU whatever the default backend (where JAX has one): a lowered program's
    cost analysis is missing where the backend is a PJRT plugin (CUDA: jax returns None, as
    on an H200 with jax 0.11.2), and so the count is the same on every machine."""
    import jax
    import jax.numpy as jnp

    from cifar_flax import train
    from cifar_flax.models import get_model
    net = get_model(config.network, **{**config.model_options(), 'conv': 'xla'}, pool='xla')
    state = jax.eval_shape(lambda: train.create_train_state(config, net, tx))
    images = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.dtype(config.dtype))
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    try:
        cpu = jax.devices('cpu')[0]
    except RuntimeError:  # JAX_PLATFORMS without the CPU: the default backend counts, if it can
        cpu = None
    with jax.default_device(cpu):  # abstract arguments: the default device picks the backend
        train_flops = _flops(jax.jit(train.make_train_step(net, tx, config)).lower(state, (images, labels)))
        forward = jax.jit(lambda v, x: net.apply(v, x, train=False))
        eval_flops = _flops(forward.lower(train.model_variables(state), images))
    per_image = lambda flops: flops / batch if flops else None
    return per_image(train_flops), per_image(eval_flops)


def measure_peak_gflops(size: int = PEAK_MATMUL_SIZE, repeats: int = 5, dtype: str = 'float32') -> float:
    """GFLOP/s of a size x size matmul in ``dtype`` (median of ``repeats``)."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.dtype(dtype))
    matmul = jax.jit(lambda a: a @ a)
    matmul(a).block_until_ready()
    rate, _ = _median_rate(lambda: matmul(a).block_until_ready(), 1, repeats)
    return 2 * size ** 3 * rate / 1e9


def bench_model(model: str, batch: int, *, dtype: str = 'float32', conv: str = 'auto',
                pool: str = 'auto', data: str | None = None, matmul_precision: str = 'default'):
    """(config, network) benchmarked: the seed protocol's Adam, with BatchNorm in training
    mode for every network, as the performance issue and tools/peer_bench.py measure the
    peers; not the seed protocol's frozen-BatchNorm GoogLeNet, whose BatchNorms are
    per-channel affine maps (no batch statistics, a cheaper backward)."""
    from cifar_flax.config import make_config
    from cifar_flax.models import get_model
    config = make_config(model, 'seed', batch_size=batch, dtype=dtype, conv=conv, data=data or '', bn='batch',
                         matmul_precision=matmul_precision)
    return config, get_model(config.network, pool=pool, **config.model_options())


def batch_indices(dataset, batch: int, num_batches: int):
    """(num_batches, batch) int32 indices into the training split: real, distinct batches
    (a fixed shuffle, repeated if the split is smaller than num_batches * batch)."""
    import numpy as np

    from cifar_flax import data as data_lib
    order = np.asarray(data_lib.epoch_permutation(0, 0, len(dataset.train_images)))
    return np.resize(order, num_batches * batch).reshape(num_batches, batch).astype(np.int32)


def bench_optimizer(config, dataset, batch: int):
    """The config's optimizer, its schedule sized to ``dataset``'s epochs at ``batch``."""
    from cifar_flax import train
    return train.make_optimizer(config, steps_per_epoch=max(1, len(dataset.train_images) // batch))


def scan_chunk_setup(model: str, batch: int, steps: int, dataset, conv: str = 'auto', dtype: str = 'float32',
                     matmul_precision: str = 'default'):
    """What `--mode scan` trains, for tools that compile and call its chunk in their own process
    (tools/ab_bench.py, tools/profile_step.py): (config, network, optimizer, chunk_args), where
    chunk_args = (images, labels, indices) on the device, indices ``steps`` real batches; the
    chunk is compiled by compile_scan_chunk."""
    import jax.numpy as jnp
    config, net = bench_model(model, batch, dtype=dtype, conv=conv, matmul_precision=matmul_precision)
    chunk_args = (jnp.asarray(dataset.train_images), jnp.asarray(dataset.train_labels),
                  jnp.asarray(batch_indices(dataset, batch, steps)))
    return config, net, bench_optimizer(config, dataset, batch), chunk_args


def compile_scan_chunk(config, net, tx, chunk_args, compiler_options: dict | None = None):
    """scan_chunk_setup's chunk, compiled (with XLA ``compiler_options``, if any), and a fresh
    train state to call it with: ``compiled(state, *chunk_args) -> (state, sums)``, state donated."""
    import jax
    from cifar_flax import train, xla_options
    state = train.create_train_state(config, net, tx)
    chunk = xla_options.jit(train.make_train_chunk(net, tx, config), donate_argnums=0)
    return chunk.lower(state, *chunk_args).compile(compiler_options=compiler_options or None), state


def run_bench(model: str, batch: int, *, steps: int = 0, window_seconds: float = 2.0,
              windows: int = 5, warmup: int = 2,
              dtype: str = 'float32', matmul_precision: str = 'default', conv: str = 'auto',
              pool: str = 'auto', devices: int = 1,
              mode: str = 'step', data: str | None = None, dataset=None, peak: bool = False,
              evaluate: bool = True) -> dict:
    """Measure one configuration; returns the JSON record. ``dataset`` (a data.Cifar10)
    overrides ``data``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from cifar_flax import data as data_lib, train, xla_options
    from cifar_flax.models import canonical_name, count_params, layers
    from cifar_flax.models.layers import resolve_conv_impl

    if mode not in MODES:
        raise ValueError(f'unknown mode {mode!r}; valid: {list(MODES)}')
    name = canonical_name(model)
    if len(jax.devices()) < devices:
        raise ValueError(f'{devices} devices requested, {len(jax.devices())} available')
    config, net = bench_model(name, batch, dtype=dtype, conv=conv, pool=pool, data=data,
                              matmul_precision=matmul_precision)

    if dataset is None:
        dataset = data_lib.load_cifar10(data)
    if mode == 'scan' and not steps:
        steps = DEFAULT_SCAN_STEPS
    # Step mode cycles through up to 20 real batches (all on the device before timing).
    num_batches = steps if mode == 'scan' else min(steps or 20, 20, len(dataset.train_images) // batch)
    if num_batches < 1:
        raise ValueError(f'the training split ({len(dataset.train_images)} images) is smaller than one batch of {batch}')
    indices = batch_indices(dataset, batch, num_batches)  # step mode cycles through them

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), ('data',)) if devices > 1 else None
    shard = (lambda x: jax.device_put(x, NamedSharding(mesh, P('data')))) if mesh else jax.device_put
    replicate = (lambda x: jax.device_put(x, NamedSharding(mesh, P()))) if mesh else jax.device_put

    tx = bench_optimizer(config, dataset, batch)
    state = replicate(train.create_train_state(config, net, tx))
    compute_dtype = jnp.dtype(dtype)
    images, labels = jnp.asarray(dataset.train_images), jnp.asarray(dataset.train_labels)
    make_batch = jax.jit(lambda images, labels, idx: data_lib.make_batch(
        images, labels, idx, jax.random.key(0), augment=False,
        normalization=config.normalization, dtype=compute_dtype))
    batches = [tuple(shard(a) for a in make_batch(images, labels, indices[i])) for i in range(num_batches)]

    start = time.perf_counter()
    if mode == 'step':
        step = xla_options.jit(train.make_train_step(net, tx, config), donate_argnums=0)
        compiled = step.lower(state, batches[0]).compile()
        state, _ = compiled(state, batches[0])
        jax.block_until_ready(state)
        compile_s = time.perf_counter() - start
        cursor = [0]

        def run_train(n):
            nonlocal state
            for _ in range(n):
                state, metrics = compiled(state, batches[cursor[0] % num_batches])
                cursor[0] += 1
            jax.block_until_ready((state, metrics))
        items_per_window = (steps or 0) * batch
    else:
        images, labels = replicate(images), replicate(labels)
        chunk = xla_options.jit(train.make_train_chunk(net, tx, config, mesh), donate_argnums=0)
        device_indices = replicate(jnp.asarray(indices))
        compiled = chunk.lower(state, images, labels, device_indices).compile()
        state, _ = compiled(state, images, labels, device_indices)
        jax.block_until_ready(state)
        compile_s = time.perf_counter() - start

        def run_train(n):
            nonlocal state
            for _ in range(n):
                state, sums = compiled(state, images, labels, device_indices)
            jax.block_until_ready((state, sums))
        items_per_window = steps * batch
    run_train(warmup if mode == 'step' else min(warmup, 1))
    if not steps:  # calibrate: windows of about window_seconds
        start = time.perf_counter()
        run_train(2)
        steps = max(1, round(window_seconds / ((time.perf_counter() - start) / 2)))
        items_per_window = steps * batch
    train_rate, train_cores = _median_rate(lambda: run_train(1 if mode == 'scan' else steps), items_per_window,
                                           windows)

    train_flops, eval_flops = model_flops(config, tx, batch)
    record = {'model': name, 'batch': batch, 'train_img_s': round(train_rate, 1), 'eval_img_s': None,
              'params': count_params(state.params), 'devices': devices, 'dtype': dtype,
              'matmul_precision': matmul_precision,
              'conv': conv, 'conv_resolved': resolve_conv_impl(conv), 'onednn': layers.uses_onednn(conv),
              'mode': mode,
              'train_gflops': None, 'flops_fraction': None,
              'train_flops_per_image': round(train_flops) if train_flops else None,
              'eval_flops_per_image': round(eval_flops) if eval_flops else None, 'peak_gflops': None,
              'steps': steps, 'windows': windows, 'compile_s': round(compile_s, 1),
              'train_cores_busy': round(train_cores, 2), 'cpu_count': os.cpu_count(),
              'backend': jax.default_backend(), 'device_kind': jax.devices()[0].device_kind,
              # other processes on the machine skew CPU timings; this says how busy it was.
              'loadavg_1m': round(os.getloadavg()[0], 2) if hasattr(os, 'getloadavg') else None,
              'jax': jax.__version__, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
              'compiler_options': xla_options.compiler_options() or {}}
    if train_flops:
        record['train_gflops'] = round(train_flops * train_rate / 1e9, 1)

    if evaluate:
        variables = train.model_variables(state)
        infer = xla_options.jit(train.under_matmul_precision(lambda v, x: net.apply(v, x, train=False),
                                                             config.matmul_precision))
        compiled_eval = infer.lower(variables, batches[0][0]).compile()
        jax.block_until_ready(compiled_eval(variables, batches[0][0]))

        def run_eval():
            for i in range(steps):
                out = compiled_eval(variables, batches[i % num_batches][0])
            jax.block_until_ready(out)
        run_eval()
        record['eval_img_s'] = round(_median_rate(run_eval, steps * batch, windows)[0], 1)

    if peak:
        record['peak_gflops'] = round(measure_peak_gflops(), 1)
        if record['train_gflops']:
            record['flops_fraction'] = round(record['train_gflops'] / record['peak_gflops'], 3)
    return record


def main(argv=None) -> None:
    # --devices must reach XLA_FLAGS before jax creates its CPU client.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--devices', type=int, default=1)
    _set_host_devices(pre.parse_known_args(argv)[0].devices)
    args = parse_args(argv)
    try:
        record = run_bench(args.model, args.batch, steps=args.steps, window_seconds=args.window_seconds,
                           windows=args.windows,
                           warmup=args.warmup, dtype=args.dtype, matmul_precision=args.matmul_precision,
                           conv=args.conv, pool=args.pool,
                           devices=args.devices, mode=args.mode, data=args.data, peak=args.peak,
                           evaluate=args.eval)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f'error: {error}')
    print(json.dumps(record), flush=True)


if __name__ == '__main__':
    main()
