"""bench: one JSON record with the documented keys, on small generated data."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cifar_flax import bench, xla_options
from tests.conftest import make_tiny_dataset

KEYS = {'model', 'batch', 'train_img_s', 'eval_img_s', 'params', 'devices', 'dtype', 'conv',
        'train_gflops', 'flops_fraction', 'train_flops_per_image', 'mode', 'compile_s'}


def write_binary_cifar(folder, num_per_file=16, seed=0):
    """A tiny CIFAR-10 binary folder (label byte + CHW pixels per record)."""
    rng = np.random.default_rng(seed)
    for name in (*(f'data_batch_{i}.bin' for i in range(1, 6)), 'test_batch.bin'):
        records = rng.integers(0, 256, (num_per_file, 1 + 3 * 32 * 32), dtype=np.uint8)
        records[:, 0] %= 10
        (folder / name).write_bytes(records.tobytes())


def test_run_bench_step_mode_record():
    record = bench.run_bench('lenet5', 8, steps=2, windows=2, warmup=1, dataset=make_tiny_dataset(64, 10),
                             peak=False)
    assert KEYS <= set(record)
    assert record['model'] == 'lenet5' and record['batch'] == 8 and record['params'] == 62_006
    assert record['train_img_s'] > 0 and record['eval_img_s'] > 0
    assert record['train_flops_per_image'] > record['eval_flops_per_image'] > 0
    assert record['flops_fraction'] is None  # no --peak
    assert record['compiler_options'] == (xla_options.compiler_options() or {})


def test_flops_are_counted_on_the_cpu_whatever_the_backend(monkeypatch):
    # CUDA's PJRT plugin has no cost analysis of a lowered program (jax returns None; the
    # first H200 sitting's FLOP columns came out empty). Simulated here: only a lowering for
    # the CPU, named as the default device, can count.
    import jax
    from cifar_flax import train
    counts = jax.stages.Lowered.cost_analysis
    on_cpu = lambda: getattr(jax.config.jax_default_device, 'platform', None) == 'cpu'
    monkeypatch.setattr(jax.stages.Lowered, 'cost_analysis', lambda self: counts(self) if on_cpu() else None)
    config, _ = bench.bench_model('lenet5', 8)
    train_flops, eval_flops = bench.model_flops(config, train.make_optimizer(config, steps_per_epoch=1), 8)
    assert train_flops > 2 * eval_flops > 0


def test_run_bench_scan_mode():
    record = bench.run_bench('lenet5', 4, steps=2, windows=1, warmup=1, mode='scan',
                             dataset=make_tiny_dataset(16, 10), evaluate=False)
    assert record['model'] == 'lenet5' and record['mode'] == 'scan'
    assert record['train_img_s'] > 0 and record['eval_img_s'] is None


def test_bench_trains_googlenet_batchnorm_in_training_mode():
    # The peers (tools/peer_bench.py) train every BatchNorm in training mode; the seed
    # protocol's GoogLeNet freezes them, which the benchmark must not inherit.
    import jax
    from cifar_flax import train
    config, net = bench.bench_model('googlenet', 4)
    assert config.network == 'inception10'
    state = train.create_train_state(config, net, train.make_optimizer(config, steps_per_epoch=1))
    images = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3))
    _, updates = jax.jit(lambda v, x: net.apply(v, x, train=True, mutable=['batch_stats']))(
        {'params': state.params, 'batch_stats': state.batch_stats}, images)
    before, after = (jax.tree_util.tree_leaves(s) for s in (state.batch_stats, updates['batch_stats']))
    assert len(before) == len(after) > 0
    assert all(not np.allclose(a, b) for a, b in zip(before, after))


def test_cli_prints_one_json_line(tmp_path):
    write_binary_cifar(tmp_path)
    env = {**os.environ, 'CIFAR_FLAX_CACHE': str(tmp_path / 'cache')}
    out = subprocess.run([sys.executable, '-m', 'cifar_flax.bench', '--model', 'lenet5', '--batch', '8',
                          '--steps', '2', '--windows', '1', '--data', str(tmp_path), '--peak'],
                         capture_output=True, text=True, env=env, timeout=600, check=True)
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert KEYS <= set(record)
    assert record['peak_gflops'] > 0 and 0 < record['flops_fraction']


@pytest.mark.parametrize('argv,message', [
    (['--model', 'lenet5', '--batch', '6', '--devices', '4'], 'divisible'),
    (['--model', 'lenet5', '--conv', 'cudnn'], 'invalid choice'),
])
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


def test_unknown_model_is_an_error():
    with pytest.raises(ValueError, match='valid'):
        bench.run_bench('resnet50', 8, dataset=make_tiny_dataset(16, 10))


def test_bench_table_takes_peers_measured_on_this_machine(tmp_path):
    from experiments import bench_table
    lines = [{'framework': f, 'model': 'inception10', 'batch': 32, 'train_img_s': rate}
             for f, rate in (('keras', 1500.4), ('torch', 1660.0))]
    path = tmp_path / 'peers.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in lines))
    peers = bench_table.load_peers(str(path))
    assert peers['inception10'][32] == (1500, 1660)
    assert peers['inception10'][128] == bench_table.PEERS['inception10'][128]  # not measured: kept
    record = {'model': 'inception10', 'batch': 32, 'train_img_s': 1660.0, 'eval_img_s': 3000.0,
              'train_flops_per_image': 66e6, 'loadavg_1m': 1.5, 'backend': 'cpu', 'cpu_count': 2,
              'jax': '0', 'dtype': 'float32', 'conv_resolved': 'hybrid', 'windows': 5, 'xla_flags': ''}
    text = bench_table.table([record], 200.0, 'cmd', 'cpu', peers, str(path))
    assert '| inception10 | 32 | 1,660 | 1,500 / 1,660 | 1.00x |' in text
    assert 'measured on this machine by `tools/peer_bench.py`' in text
    path.write_text(json.dumps(lines[0]) + '\n')
    with pytest.raises(ValueError, match='both a keras and a torch'):
        bench_table.load_peers(str(path))


def test_bench_table_rows_compare_with_peers():
    from experiments import bench_table
    record = {'model': 'inception10', 'batch': 32, 'train_img_s': 1660.0, 'eval_img_s': 3000.0,
              'train_flops_per_image': 66e6, 'loadavg_1m': 1.5, 'backend': 'cpu', 'cpu_count': 2,
              'jax': '0', 'dtype': 'float32', 'conv_resolved': 'hybrid', 'windows': 5, 'xla_flags': ''}
    text = bench_table.table([record], peak=200.0, command='python -m experiments.bench_table',
                             machine='x86_64, Some CPU, AVX2')
    assert text.splitlines()[0] == '# Training and inference throughput on CPU (2 cores; x86_64, Some CPU, AVX2)'
    assert "(XLA_FLAGS='', jax 0," in text  # a record from before compiler_options
    options = {'xla_cpu_copy_insertion_use_region_analysis': True}
    text = bench_table.table([{**record, 'compiler_options': options}], peak=200.0, command='cmd',
                             machine='cpu')
    assert "(XLA_FLAGS='', xla_cpu_copy_insertion_use_region_analysis=true, jax 0," in text
    row = next(line for line in text.splitlines() if line.startswith('| inception10'))
    # 1,660 img/s against the faster peer's 830; 66 MFLOP x 1,660/s = 109.6 GFLOP/s = 55% of 200.
    assert row == '| inception10 | 32 | 1,660 | 775 / 830 | 2.00x | 3,000 | 109.6 | 55% | 1.5 |'
