"""How much faster is a sweep group than separate runs? Prints JSON.

  python -m experiments.sweep_speed --data /work/shared/data/cifar10-jpeg        # the CPU check
  python -m experiments.sweep_speed --synthetic --train-subset 50000 --repeats 3 # e.g. on a GPU

K learning-rate members of one network (default GoogLeNet on the seed
protocol, 1 epoch on a 5,000-image subset, evaluation on the 10,000 test
images each epoch), three ways, each in a fresh process (nothing compiled is
shared between measurements):

* sequential: K runs of the trainer, as K `train.fit` runs would do them
  (a Trainer each, so each compiles its own programs; no checkpoints);
* vmap: one sweep group, the members vmapped in one program;
* loop: one sweep group, one compiled program run for one member after another.

For each: total wall seconds (building, compiling, training, evaluating),
process CPU seconds, and the steady-state milliseconds per member-step (chunks
that did not compile: not a program's first call with a chunk shape). With the
default 5,000 images that leaves few chunks; --steps-per-call 26 gives six
equal chunks per epoch (the trainer's results do not depend on it). Ratios are sequential / mode, so
above 1 is faster than separate runs; with --repeats the medians are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODES = ("sequential", "vmap", "loop")
DEFAULT_LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


def synthetic_dataset(num_train: int, num_test: int = 10_000):
  import numpy as np
  from cifar_flax.data import CLASS_NAMES, Cifar10
  rng = np.random.default_rng(0)
  make = lambda n: (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                    rng.integers(0, 10, n).astype(np.int32))
  (train_images, train_labels), (test_images, test_labels) = make(num_train), make(num_test)
  return Cifar10(train_images=train_images, train_labels=train_labels, test_images=test_images,
                 test_labels=test_labels, class_names=tuple(CLASS_NAMES))


def member_configs(args):
  from cifar_flax.config import make_config
  base = make_config(args.network, "seed", epochs=args.epochs, train_subset=args.train_subset,
                     steps_per_call=args.steps_per_call, quiet=True)
  rates = DEFAULT_LEARNING_RATES[:args.members] if args.members <= 5 else [
      1e-4 * 10 ** (2 * i / (args.members - 1)) for i in range(args.members)]
  return [base.replace(learning_rate=rate) for rate in rates]


def _timed_chunks(run_chunk, chunks, state):
  """Runs the chunks one by one, waiting for each; returns (state, seconds per chunk)."""
  import jax
  seconds = []
  for chunk in chunks:
    start = time.perf_counter()
    state, sums = run_chunk(state, chunk)
    jax.block_until_ready(sums)
    seconds.append(time.perf_counter() - start)
  return state, seconds


def run_worker(args) -> dict:
  """One measurement of one mode, in this process."""
  import jax
  from cifar_flax import data as data_lib, sweep, train
  dataset = (synthetic_dataset(args.train_subset) if args.synthetic
             else data_lib.load_cifar10(args.data or None))
  configs = member_configs(args)
  wall, cpu = time.perf_counter(), time.process_time()
  chunk_seconds, chunk_steps = [], []

  def record(program, seconds, chunks, members):
    # The first call of a program with a new chunk shape compiles it (an
    # epoch's last chunk is usually shorter): steady state leaves those out.
    for s, c in zip(seconds, chunks):
      if (program, c.shape) in compiled:
        chunk_seconds.append(s)
        chunk_steps.append(c.shape[-2] * members)
      compiled.add((program, c.shape))

  compiled = set()
  if args.mode == "sequential":
    for index, config in enumerate(configs):
      trainer = train.Trainer(config, dataset)
      state = trainer.init_state()
      for epoch in range(1, config.epochs + 1):
        chunks = trainer.chunks(trainer.epoch_indices(state.seed, epoch))
        state, seconds = _timed_chunks(
            lambda s, c: trainer.train_chunk(s, trainer.train_images, trainer.train_labels, c),
            chunks, state)
        record(index, seconds, chunks, 1)
        jax.block_until_ready(trainer.evaluate(train.model_variables(state),
                                               trainer.test_images, trainer.test_labels))
  else:
    group = sweep.GroupTrainer(configs, dataset, args.mode)
    state = group.init_state()
    trainer = group.trainer
    for epoch in range(1, configs[0].epochs + 1):
      if args.mode == "vmap":
        chunks = trainer.chunks(group.epoch_indices(state.seed, epoch))
        state, seconds = _timed_chunks(
            lambda s, c: group.train_chunk(s, group.train_images, group.train_labels, c),
            chunks, state)
        record(0, seconds, chunks, len(configs))
      else:
        members = []
        for index, member in enumerate(sweep.unstack_tree(state, len(configs))):
          chunks = trainer.chunks(trainer.epoch_indices(member.seed, epoch))
          member, seconds = _timed_chunks(
              lambda s, c: trainer.train_chunk(s, trainer.train_images, trainer.train_labels, c),
              chunks, member)
          record(0, seconds, chunks, 1)
          members.append(member)
        state = sweep.stack_trees(members)
      group.evaluate_all(state)
  steps = sum(chunk_steps)
  return {"mode": args.mode, "members": len(configs), "wall_s": time.perf_counter() - wall,
          "cpu_s": time.process_time() - cpu,
          "steady_ms_per_member_step": 1000 * sum(chunk_seconds) / steps if steps else None,
          "backend": jax.default_backend(), "devices": jax.device_count()}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--network", default="inception10")
  parser.add_argument("--members", type=int, default=5)
  parser.add_argument("--epochs", type=int, default=1)
  parser.add_argument("--train-subset", type=int, default=5000)
  parser.add_argument("--data", default="", help="data source (default $CIFAR_FLAX_DATA or tfds)")
  parser.add_argument("--synthetic", action="store_true", help="random images instead of data")
  parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of "
                      + ", ".join(MODES))
  parser.add_argument("--steps-per-call", type=int, default=100,
                      help="train steps per device call (the trainer's default)")
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--worker", dest="mode", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.mode:
    print(json.dumps(run_worker(args)), flush=True)
    return 0
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  bad = [m for m in modes if m not in MODES]
  if bad or "sequential" not in modes:
    parser.error(f"--modes must include sequential and only name {', '.join(MODES)}")
  base_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
  runs: dict[str, list[dict]] = {m: [] for m in modes}
  for repeat in range(args.repeats):
    for mode in modes:  # interleaved, so a busy spell hits every mode alike
      out = subprocess.run([sys.executable, "-m", "experiments.sweep_speed", *base_argv,
                            "--worker", mode], check=True, capture_output=True, text=True,
                           env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
      result = json.loads(out.stdout.strip().splitlines()[-1])
      runs[mode].append(result)
      print(f"# repeat {repeat + 1} {mode}: {json.dumps(result)}", file=sys.stderr, flush=True)

  def median(mode, key):
    values = [r[key] for r in runs[mode] if r[key] is not None]
    return statistics.median(values) if values else None

  summary = {"network": args.network, "members": args.members, "epochs": args.epochs,
             "train_subset": args.train_subset, "repeats": args.repeats,
             "backend": runs["sequential"][0]["backend"], "runs": runs, "median": {}, "ratio": {}}
  for mode in modes:
    summary["median"][mode] = {k: median(mode, k)
                               for k in ("wall_s", "cpu_s", "steady_ms_per_member_step")}
  for mode in modes:
    if mode == "sequential":
      continue
    seq, other = summary["median"]["sequential"], summary["median"][mode]
    summary["ratio"][mode] = {k: seq[k] / other[k] for k in seq if seq[k] and other[k]}
  print(json.dumps(summary, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
