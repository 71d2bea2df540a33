"""In-process A/B of code variants: training images/s of one network, variants called in turn.

  python tools/ab_bench.py --model resnet18 --batch 32 --steps 4 --rounds 9 \\
      --data ../shared/data/cifar10-jpeg \\
      'base' 'lists:{"models.layers.WINOGRAD_MIN_PIXELS": 1024}'

Each variant is NAME or NAME:{JSON}, the JSON mapping MODULE.ATTR (a module under
`cifar_flax`) to the value that attribute takes while the variant's training chunk is
traced and compiled (module-level thresholds and switches are read at trace time), restored
after, or an XLA option (a key starting with 'xla_', e.g. "xla_cpu_multi_thread_eigen": false)
to the value it is compiled with (`compile(compiler_options=...)`: this chunk only, where
XLA_FLAGS would set it for the whole process). Every variant's chunk (`bench --mode scan`'s: STEPS real Adam steps in one
`lax.scan`) is compiled side by side in one process; then each round calls every variant
once, in turn, the order rotated by one each round (call_order). This machine's swings (a third
of a cell from one window to the next) then hit all variants alike, which separate processes
minutes apart do not: the figure that matters is the median of the per-round ratios to the first
variant, with the rounds it won. Read it against an A/A run (the same variant twice): on the
AVX2 EPYC, GoogLeNet at batch 32, 1.03x (7 of 13 rounds faster) in a fixed order and 0.97x
(6 of 15) rotated: a few percent either way is noise.

Per-round rates go to stderr; stdout gets one JSON line per variant:
{"variant", "overrides", "median_img_s", "paired_ratio", "rounds_faster", "rounds",
 "first_loss_sum", "rates"} (first_loss_sum: the first chunk's summed loss, from the same
initial state and batches, so variants that claim the same arithmetic can be checked).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

XLA_PREFIX = "xla_"


def parse_variant(spec: str) -> tuple[str, dict]:
  name, _, overrides = spec.partition(":")
  if not name:
    raise ValueError(f"variant {spec!r} has no name")
  overrides = json.loads(overrides) if overrides else {}
  if not isinstance(overrides, dict):
    raise ValueError(f"variant {name!r}: overrides must be a JSON object, got {overrides!r}")
  for key in overrides:
    if not key.startswith(XLA_PREFIX):
      _target(key)  # fail before any compiling
  return name, overrides


def split_overrides(overrides: dict) -> tuple[dict, dict]:
  """-> (module attribute overrides, XLA compiler options)."""
  xla = {k: v for k, v in overrides.items() if k.startswith(XLA_PREFIX)}
  return {k: v for k, v in overrides.items() if k not in xla}, xla


def _target(key: str):
  """'models.layers.WINOGRAD_MIN_PIXELS' -> (cifar_flax.models.layers, 'WINOGRAD_MIN_PIXELS')."""
  module_name, _, attr = key.rpartition(".")
  if not module_name:
    raise ValueError(f"override {key!r} is not MODULE.ATTR")
  module = importlib.import_module(f"cifar_flax.{module_name}")
  if not hasattr(module, attr):  # a typo would otherwise measure nothing
    raise ValueError(f"cifar_flax.{module_name} has no attribute {attr!r}")
  return module, attr


@contextlib.contextmanager
def overridden(overrides: dict):
  saved = []
  try:
    for key, value in overrides.items():
      module, attr = _target(key)
      saved.append((module, attr, getattr(module, attr)))
      setattr(module, attr, value)
    yield
  finally:
    for module, attr, value in reversed(saved):
      setattr(module, attr, value)


def call_order(count: int, round_index: int) -> list[int]:
  """The variants' order in a round, rotated by one each round: no variant always runs right
  after another (on this machine the one called second can gain or lose a few percent)."""
  first = round_index % count
  return [*range(first, count), *range(first)]


def compare(model: str, batch: int, steps: int, rounds: int, variants, dataset, log=None,
            dtype: str = "float32", matmul_precision: str = "default") -> list[dict]:
  """Compile every variant's training chunk, call them in turn ``rounds`` times; one record each.
  Per-round rates go to ``log`` (default: stderr)."""
  log = log or sys.stderr
  import jax

  from cifar_flax import bench

  config, net, tx, chunk_args = bench.scan_chunk_setup(model, batch, steps, dataset, dtype=dtype,
                                                       matmul_precision=matmul_precision)

  runs = []
  for name, overrides in variants:
    attrs, xla_options = split_overrides(overrides)
    with overridden(attrs):
      compiled, state = bench.compile_scan_chunk(config, net, tx, chunk_args, xla_options)
    state, sums = compiled(state, *chunk_args)  # also the warm-up
    runs.append({"variant": name, "overrides": overrides, "compiled": compiled, "state": state,
                 "first_loss_sum": float(sums["loss_sum"]), "rates": []})
  for r in range(rounds):
    for i in call_order(len(runs), r):
      run = runs[i]
      start = time.perf_counter()
      run["state"], sums = run["compiled"](run["state"], *chunk_args)
      jax.block_until_ready((run["state"], sums))
      run["rates"].append(steps * batch / (time.perf_counter() - start))
    print(f"round {r}: " + "  ".join(f"{run['variant']} {run['rates'][-1]:.1f}" for run in runs),
          file=log, flush=True)

  base = runs[0]["rates"]
  records = []
  for run in runs:
    ratios = [a / b for a, b in zip(run["rates"], base)]
    records.append({"variant": run["variant"], "overrides": run["overrides"],
                    "median_img_s": round(statistics.median(run["rates"]), 1),
                    "paired_ratio": round(statistics.median(ratios), 3),
                    "rounds_faster": sum(ratio > 1 for ratio in ratios), "rounds": rounds,
                    "first_loss_sum": run["first_loss_sum"],
                    "rates": [round(rate, 1) for rate in run["rates"]]})
  return records


def main(argv=None) -> None:
  from cifar_flax.config import DTYPES, MATMUL_PRECISIONS
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=4, help="training steps per call (one lax.scan)")
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--data", default=None, help="data spec (see cifar_flax.data)")
  p.add_argument("--dtype", choices=DTYPES, default="float32")
  p.add_argument("--matmul-precision", default="default", choices=MATMUL_PRECISIONS,
                 help="jax.default_matmul_precision of the programs")
  p.add_argument("variants", nargs="+", help="NAME or NAME:{JSON overrides}; the first is the baseline")
  args = p.parse_args(argv)
  if min(args.batch, args.steps, args.rounds) < 1:
    p.error("--batch, --steps and --rounds must be positive")
  try:
    variants = [parse_variant(spec) for spec in args.variants]
  except (ValueError, ImportError) as error:
    p.error(str(error))
  from cifar_flax import data as data_lib
  for record in compare(args.model, args.batch, args.steps, args.rounds, variants,
                        data_lib.load_cifar10(args.data), dtype=args.dtype,
                        matmul_precision=args.matmul_precision):
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
  main()
