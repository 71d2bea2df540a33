#!/usr/bin/env bash
# Second GPU call: tracebacks of the failures, the tests not reached, determinism across processes.
set -u
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export CIFAR_FLAX_CACHE=/tmp/cifar_flax_cache
OUT=${OUT:-out}; mkdir -p "$OUT"; DATA=/tmp/cifar10-jpeg
part() { echo; echo "=== $1 (at ${SECONDS}s)"; }
main() {
part setup
python3 tools/jpeg_pack.py unpack .devdata/cifar10-jpeg.pack.npz $DATA || return 1
python3 -c "from cifar_flax.data import load_cifar10; d = load_cifar10('$DATA'); print(d.train_images.shape)"
part "flag probe"
for f in --xla_gpu_deterministic_ops=true --xla_gpu_exclude_nondeterministic_ops=true --xla_gpu_autotune_level=0; do
  XLA_FLAGS=$f timeout 30 python3 -c "import jax, jax.numpy as jnp; print(jnp.ones(3).sum())" >/dev/null 2>&1 && echo "flag ok: $f" || echo "flag REJECTED: $f"
done
timeout 40 python3 - <<'PY'
import jax, jax.numpy as jnp
for k in ("xla_gpu_deterministic_ops", "xla_gpu_exclude_nondeterministic_ops"):
  try:
    jax.jit(lambda x: x.sum(), compiler_options={k: True})(jnp.ones(3)).block_until_ready(); print("compiler_options ok:", k)
  except Exception as e:
    print("compiler_options REJECTED:", k, type(e).__name__, str(e)[:200])
PY
part "tests (failures + not reached) | determinism pairs, concurrently"
ids=$(cat .devdata/test_ids.txt)
timeout 150 python3 -m pytest -q --tb=short -rs -n 6 -p no:cacheprovider $ids > "$OUT/tests.txt" 2>&1 &
declare -A FL=([plain]="" [detops]="--xla_gpu_deterministic_ops=true" [exclude]="--xla_gpu_exclude_nondeterministic_ops=true" [exclude_at0]="--xla_gpu_exclude_nondeterministic_ops=true --xla_gpu_autotune_level=0")
for name in plain detops exclude exclude_at0; do for rep in 1 2; do
  XLA_FLAGS="${FL[$name]}" timeout 100 python3 -m experiments.lenet5 --data $DATA --quiet --train-subset 20000 --epochs 1 --workdir /tmp/det/$name-$rep > /tmp/det-$name-$rep.log 2>&1 &
done; done
wait
tail -n 40 "$OUT/tests.txt"
python3 - <<'PY'
import json, os
from tests.test_train import timeless
for name in ("plain", "detops", "exclude", "exclude_at0"):
  h = []
  for rep in (1, 2):
    p = f"/tmp/det/{name}-{rep}/history.json"
    h.append(timeless(json.load(open(p))) if os.path.exists(p) else None)
  print(name, "identical" if h[0] == h[1] and h[0] else "DIFFER", h)
PY
grep -h "img/s" /tmp/det-*.log
part "resume + sweep tests with the deterministic flag"
XLA_FLAGS="${DETFLAG:---xla_gpu_exclude_nondeterministic_ops=true}" timeout 90 python3 -m pytest -q --tb=short -n 3 -p no:cacheprovider tests/test_train.py::test_resume_is_bitwise_identical tests/test_train.py::test_dropout_and_batchnorm_network_resumes_exactly tests/test_sweep.py::test_vmapped_members_match_separate_fits_and_outputs 2>&1 | tail -n 30
part "sweep group speed"
timeout ${SWEEP_S:-100} python3 -m experiments.sweep_speed --data $DATA | tee "$OUT/sweep_speed_gpu.json"
part done
}
main 2>&1 | tee "$OUT/log2.txt"
