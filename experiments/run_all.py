"""Everything the results need, in one command: the five networks under both
protocols and the six hyperparameter studies, then `results/`.

  python -m experiments.run_all --data ../shared/data/cifar10-jpeg            # CPU: one job at a time
  python -m experiments.run_all --data /tmp/cifar10-jpeg --jobs 12            # a GPU: jobs share it

Each job is an ordinary experiment command with its own log in logs/; all of
them resume, so re-running after an interruption continues where it stopped.
A smoke test of the whole pipeline: `--extra "--epochs 1 --train-subset 500"`.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from experiments import summarize

NETWORK_MODULES = ("lenet5", "alexnet8", "vgg16", "googlenet", "resnet18")
PROTOCOLS = ("seed", "recipe")
STUDIES = ("epochs", "learning_rate", "optimizer", "batch_size", "loss", "activation")


def planned_jobs(args) -> list[tuple[str, list[str]]]:
  python = [sys.executable, "-m"]
  extra = shlex.split(args.extra)
  jobs = []
  if "studies" in args.only:  # the 50-epoch study is the longest: start it first.
    for study in args.studies:
      jobs.append((f"study-{study}", python + ["experiments.sweeps", study, "--quiet",
                                               "--data", args.data] + extra))
  if "runs" in args.only:
    for protocol in PROTOCOLS:
      for module in args.networks:
        jobs.append((f"{module}-{protocol}",
                     python + [f"experiments.{module}", "--protocol", protocol, "--quiet",
                               "--data", args.data] + shlex.split(args.run_args) + extra))
  return jobs


def run_job(name: str, command: list[str], log_dir: Path) -> tuple[str, int, float]:
  start = time.perf_counter()
  with open(log_dir / f"{name}.log", "a") as log:
    log.write("$ " + shlex.join(command) + "\n")
    log.flush()
    code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
  seconds = time.perf_counter() - start
  print(f"[{time.strftime('%H:%M:%S')}] {name}: exit {code} after {seconds:.0f}s", flush=True)
  return name, code, seconds


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", required=True, help="data source for every job")
  parser.add_argument("--jobs", type=int, default=1, help="jobs run at once (GPU: several)")
  parser.add_argument("--only", nargs="+", default=["runs", "studies"], choices=["runs", "studies"])
  parser.add_argument("--networks", nargs="+", default=list(NETWORK_MODULES),
                      choices=NETWORK_MODULES)
  parser.add_argument("--studies", nargs="+", default=list(STUDIES), choices=STUDIES)
  parser.add_argument("--run-args", default="", help="extra options for the network runs only")
  parser.add_argument("--extra", default="", help="extra options for every job")
  parser.add_argument("--log-dir", type=Path, default=Path("logs"))
  parser.add_argument("--results", type=Path, default=Path("results"))
  args = parser.parse_args(argv)
  args.log_dir.mkdir(parents=True, exist_ok=True)
  jobs = planned_jobs(args)
  print(f"{len(jobs)} jobs, {args.jobs} at a time; logs in {args.log_dir}/", flush=True)
  with ThreadPoolExecutor(args.jobs) as pool:
    outcomes = list(pool.map(lambda job: run_job(*job, args.log_dir), jobs))
  summarize.write_results(Path("ckpt"), args.results, command="python -m experiments.run_all "
                          + shlex.join(argv if argv is not None else sys.argv[1:]))
  failed = [name for name, code, _ in outcomes if code != 0]
  print(f"results in {args.results}/; failed: {', '.join(failed) or 'none'}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
