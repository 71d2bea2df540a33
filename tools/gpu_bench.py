"""Throughput of the networks on an accelerator, in one process, within a time budget.

  python tools/gpu_bench.py --data /tmp/cifar10-jpeg --out results/bench_gpu_h200 \\
      --grid 'all:32,128:float32:auto' --grid 'all:128:bfloat16:auto' --grid 'all:128:float32:gemm' \\
      --budget-s 240

Each --grid is MODELS:BATCHES:DTYPES:CONVS (comma lists; 'all' = every network), run in
order, every combination a `cifar_flax.bench.run_bench` record in scan mode (a chunk of
steps in one `lax.scan`, as `train.fit` runs them). Unlike `experiments.bench_table`, which
gives each CPU measurement its own process, everything runs in one process: on a lent GPU
the scarce thing is device time, and a process per record would pay the backend's start
and the data's loading every time. Records are appended to <out>.jsonl as they finish, and
no record starts once --budget-s has passed, so a sitting cut short keeps what it measured;
<out>.md is the table. The peaks are an 8192^2 matmul in float32 (JAX's default precision:
TF32 on NVIDIA GPUs since Ampere) and in bfloat16, measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

PEAK_SIZE = 8192


def parse_grid(spec: str) -> list[tuple[str, int, str, str]]:
  """'lenet5,vgg16:32,128:float32:auto' -> [(model, batch, dtype, conv), ...]."""
  from cifar_flax.models import CONV_IMPLS, MODEL_NAMES, canonical_name
  from cifar_flax.models.layers import check_impl, get_dtype
  parts = spec.split(":")
  if len(parts) != 4:
    raise ValueError(f"grid {spec!r} is not MODELS:BATCHES:DTYPES:CONVS")
  models, batches, dtypes, convs = (p.split(",") for p in parts)
  try:
    batches = [int(b) for b in batches]
  except ValueError:
    raise ValueError(f"grid {spec!r}: batches must be integers") from None
  try:  # the library's own checks, named by the grid they came from
    models = list(MODEL_NAMES) if models == ["all"] else [canonical_name(m) for m in models]
    if min(batches) < 1:
      raise ValueError("batches must be positive")
    for dtype in dtypes:
      get_dtype(dtype)
    for conv in convs:
      check_impl(conv, CONV_IMPLS, "conv")
  except ValueError as error:
    raise ValueError(f"grid {spec!r}: {error}") from None
  return [(m, b, d, c) for m in models for b in batches for d in dtypes for c in convs]


def table(records: list[dict], peaks: dict, command: str) -> str:
  first = records[0]
  lines = [
      f"# Training and inference throughput on {first['device_kind']} ({first['backend']})", "",
      f"Made by `{command}` on {time.strftime('%Y-%m-%d')} (jax {first['jax']}; one process; scan "
      "mode: a chunk of steps in one `lax.scan`, as training runs). Images/s are the median of "
      f"{first['windows']} timed windows after compilation and warm-up. 'of peak': model training "
      "FLOPs x images/s over an 8192^2 matmul of the same dtype measured in the same process "
      + ", ".join(f"{d} {v / 1e3:,.0f} TFLOP/s" for d, v in peaks.items())
      + "; float32 is JAX's default precision (TF32 on NVIDIA GPUs).", "",
      "| network | batch | dtype | conv | train img/s | eval img/s | train TFLOP/s | of peak | compile s |",
      "|---|---|---|---|---|---|---|---|---|"]
  for r in records:  # train_gflops and flops_fraction: run_bench's and main's, None without FLOPs
    tflops = "" if r["train_gflops"] is None else f"{r['train_gflops'] / 1e3:.2f}"
    of_peak = "" if r["flops_fraction"] is None else f"{r['flops_fraction']:.1%}"
    lines.append(
        f"| {r['model']} | {r['batch']} | {r['dtype']} | {r['conv_resolved']} | {r['train_img_s']:,.0f} "
        f"| {r['eval_img_s']:,.0f} | {tflops} | {of_peak} | {r['compile_s']} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", default=None, help="data spec (default: $CIFAR_FLAX_DATA or tfds)")
  p.add_argument("--out", required=True, help="output path without extension")
  p.add_argument("--grid", action="append", required=True, help="MODELS:BATCHES:DTYPES:CONVS")
  p.add_argument("--steps", type=int, default=0, help="steps per timed chunk (0: bench's default)")
  p.add_argument("--windows", type=int, default=5)
  p.add_argument("--budget-s", type=float, default=float("inf"),
                 help="start no record after this many seconds")
  p.add_argument("--peak-size", type=int, default=PEAK_SIZE)
  args = p.parse_args(argv)
  try:
    configs = [c for spec in args.grid for c in parse_grid(spec)]
  except ValueError as error:
    p.error(str(error))

  import jax

  from cifar_flax import data as data_lib
  from cifar_flax.bench import measure_peak_gflops, run_bench
  start = time.perf_counter()
  command = "python tools/gpu_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
  print(f"backend {jax.default_backend()}, devices {jax.devices()}", flush=True)
  dataset = data_lib.load_cifar10(args.data)
  peaks = {d: measure_peak_gflops(args.peak_size, dtype=d) for d in ("float32", "bfloat16")}
  print(f"matmul peaks (GFLOP/s): {peaks}", flush=True)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  jsonl = out.with_suffix(".jsonl")
  jsonl.write_text("")
  records, skipped = [], []
  for model, batch, dtype, conv in configs:
    if time.perf_counter() - start > args.budget_s:
      skipped.append(f"{model}:{batch}:{dtype}:{conv}")
      continue
    record = run_bench(model, batch, steps=args.steps, windows=args.windows, dtype=dtype, conv=conv,
                       mode="scan", dataset=dataset)
    record["peak_gflops"] = round(peaks[dtype], 1)
    if record["train_gflops"]:  # from the record's own figures, as run_bench computes it
      record["flops_fraction"] = round(record["train_gflops"] / record["peak_gflops"], 4)
    records.append(record)
    with jsonl.open("a") as f:
      f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)
  if skipped:
    print(f"budget of {args.budget_s:.0f} s spent; not measured: {' '.join(skipped)}", flush=True)
  if records:
    out.with_suffix(".md").write_text(table(records, peaks, command))
    print(out.with_suffix(".md").read_text(), flush=True)
  return 0 if records else 1


if __name__ == "__main__":
  sys.exit(main())
