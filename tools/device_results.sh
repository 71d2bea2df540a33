#!/usr/bin/env bash
# Run the results on a rented accelerator box in one go, within a time budget,
# and leave everything worth keeping in $OUT/results.tgz.
#
# The data travels packed (tools/jpeg_pack.py: 24 MB instead of 60,000 files):
#   python tools/jpeg_pack.py pack ../shared/data/cifar10-jpeg .devdata/cifar10-jpeg.pack.npz
# On the box: BUDGET=420 bash tools/device_results.sh
set -u
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 MPLBACKEND=Agg
OUT=${OUT:-out}; mkdir -p "$OUT" logs
BUDGET=${BUDGET:-420}
DATA=/tmp/cifar10-jpeg
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
python3 tools/jpeg_pack.py unpack .devdata/cifar10-jpeg.pack.npz $DATA
python3 -c "from cifar_flax.data import load_cifar10; d = load_cifar10('$DATA'); print('data', d.train_images.shape, d.test_images.shape)"
# Preflight: one tiny run and one tiny sweep must work before the budget is spent.
python3 -m experiments.lenet5 --data $DATA --epochs 1 --train-subset 2000 --workdir /tmp/pre --quiet || exit 1
python3 -m experiments.sweeps learning_rate --data $DATA --epochs 1 --train-subset 512 --workdir /tmp/pre-sweep --quiet || exit 1
if [ -f cifar_flax/bench.py ]; then
  for dtype in float32 bfloat16; do
    timeout 45 python3 -m cifar_flax.bench --model resnet18 --batch 128 --dtype $dtype --data $DATA | tee -a "$OUT/bench_gpu.jsonl"
  done
fi
# One device call per epoch: --steps-per-call above the largest epoch (1,562 steps at batch 32).
timeout -s INT "$BUDGET" python3 -m experiments.run_all --data $DATA --jobs 16 --extra "--steps-per-call 1600"
pkill -INT -f "experiments\." ; sleep 3; pkill -9 -f "experiments\."
python3 -m experiments.summarize
tar czf "$OUT/results.tgz" results logs $(ls -d ckpt/*/history.json ckpt/*/config.json ckpt/*/curves.png \
  ckpt/lenet5-*/inference ckpt/inception10-*/inference ckpt/sweeps/*/*.md ckpt/sweeps/*/*.json \
  ckpt/sweeps/*/*.png 2>/dev/null)
ls -la "$OUT"
