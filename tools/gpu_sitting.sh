#!/usr/bin/env bash
# One short sitting on a lent GPU: the checks that need it, within a fixed time, in one call.
#
#   python tools/jpeg_pack.py pack ../shared/data/cifar10-jpeg .devdata/cifar10-jpeg.pack.npz
#   (on the GPU box, .devdata carried)  bash tools/gpu_sitting.sh
#
# Each part has its own timeout, so one that hangs or runs long cannot eat the others. The
# first sitting, 2026-12-04, needed more than 130 s for the tests, 70 s for the sweep group and
# ~60 s for the training part (whose timeouts allow 300). With that training time and every
# other part using all of its timeout (tests 170, bench 170, part 2b 3 x 40, sweep 120), the
# sitting takes ~640 s: past a 600 s call, the sweep group, last and least important, is what
# gets cut. All output goes to $OUT/log.txt, the bench records to $OUT/bench_gpu.{jsonl,md} as
# they finish, and the run folders' histories to $OUT/runs.tgz. Parts, most important first:
#   1. tests whose code paths differ on a GPU: conv 'xla' vs the GEMM forms (outputs and
#      gradients), 'auto' resolving to XLA's convolution and pooling, the bench, exact resume;
#   2. tools/gpu_bench.py: every network at batch 32 and 128 in float32, then bfloat16 and
#      the GEMM convolution at batch 128 (does 'auto' = XLA's own hold on the GPU?); then
#      what excluding XLA's non-deterministic ops (xla_options, for exact resume) costs:
#      tools/ab_bench.py, the option on and off in one process, three networks at 128;
#   3. training through the experiment modules: LeNet-5 two epochs straight and one + one
#      resumed (the histories must agree exactly), and one full ResNet-18 recipe epoch;
#   4. experiments.sweep_speed: a sweep group vmapped (the GPU default) against looped and
#      against separate runs.
set -u
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export CIFAR_FLAX_CACHE=/tmp/cifar_flax_cache
OUT=${OUT:-out}; mkdir -p "$OUT"
DATA=/tmp/cifar10-jpeg
part() { echo; echo "=== $1 (at ${SECONDS}s, $(date -u +%H:%M:%S) UTC)"; }

sitting() {

part environment
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
python3 tools/jpeg_pack.py unpack .devdata/cifar10-jpeg.pack.npz $DATA || return 1
python3 -c "from cifar_flax.data import load_cifar10; d = load_cifar10('$DATA'); print('data', d.train_images.shape, d.test_images.shape)" || return 1

part "1. tests on the GPU"
tests="tests/test_models.py tests/test_bench.py tests/test_train.py::test_resume_is_bitwise_identical
  tests/test_train.py::test_dropout_and_batchnorm_network_resumes_exactly
  tests/test_sweep.py::test_vmapped_members_match_separate_fits_and_outputs"
# (tests/conftest.py runs them at full float32 precision: JAX's default is TF32 on these GPUs.)
timeout ${TESTS_S:-170} python3 -m pytest -v --tb=short -rs -n 8 -p no:cacheprovider $tests  # -v: each result is in the log even if the timeout cuts the run

part "2. bench"
timeout ${BENCH_S:-170} python3 tools/gpu_bench.py --data $DATA --out "$OUT/bench_gpu" --budget-s $(( ${BENCH_S:-170} - 20 )) \
  --grid all:32,128:float32:auto --grid all:128:bfloat16:auto --grid all:128:float32:gemm

part "2b. excluding non-deterministic ops: on (the library's) against off"
for model in lenet5 inception10 resnet18; do
  timeout 40 python3 tools/ab_bench.py --model $model --batch 128 --steps 50 --rounds 9 --data $DATA \
    'deterministic' 'default:{"xla_gpu_exclude_nondeterministic_ops": false}' | tee -a "$OUT/determinism_ab.jsonl"
done

part "3. training"
common="--data $DATA --quiet --train-subset ${SUBSET:-20000}"
timeout 60 python3 -m experiments.lenet5 $common --epochs 2 --workdir /tmp/runs/lenet5-straight
timeout 60 python3 -m experiments.lenet5 $common --epochs 1 --workdir /tmp/runs/lenet5-resumed
timeout 60 python3 -m experiments.lenet5 $common --epochs 2 --workdir /tmp/runs/lenet5-resumed
python3 - <<'EOF'
import json
from tests.test_train import timeless  # the resume tests' comparison: histories without timings
a, b = (timeless(json.load(open(f"/tmp/runs/lenet5-{n}/history.json"))) for n in ("straight", "resumed"))
print("resume on the GPU:", "histories identical" if a == b else f"DIFFER\n{a}\n{b}")
EOF
timeout 120 python3 -m experiments.resnet18 --protocol recipe --data $DATA --quiet --epochs 1 --workdir /tmp/runs/resnet18-recipe-1epoch
tar czf "$OUT/runs.tgz" --exclude checkpoints --exclude inference -C /tmp runs  # params stay: a ResNet-18 is 45 MB, over what comes back

part "4. sweep group: vmap vs loop vs separate runs"
timeout ${SWEEP_S:-120} python3 -m experiments.sweep_speed --data $DATA --train-subset 10000 | tee "$OUT/sweep_speed_gpu.json"

part done
ls -la "$OUT"
}

sitting 2>&1 | tee "$OUT/log.txt"  # a pipeline: the log is complete when the script returns
