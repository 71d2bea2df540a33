"""The performance table: `cifar_flax.bench` for every network at batch 32 and 128.

  python -m experiments.bench_table --data ../shared/data/cifar10-jpeg [--out results/bench_cpu]
  XLA_FLAGS=--xla_cpu_use_onednn=true python -m experiments.bench_table --batches 32 --out ...

Each measurement runs in its own process (nothing compiled or cached is shared)
in 'scan' mode, the way `train.fit` trains: a chunk of steps in one `lax.scan`.
Writes <out>.json (every bench record) and <out>.md (a table with the peers'
figures, the ratio to the faster peer, and training FLOP/s as a fraction of the
float32 matmul peak measured in the same session).

The peers' figures default to those the performance issue measured on a machine
with a ~180 GFLOP/s matmul. Machines of one kind differ (another measured 380), so
on any other, measure the peers there first and pass them with --peers:

  for m in lenet5 alexnet8 vgg16 inception10 resnet18; do for b in 32 128; do for f in keras torch; do
    python tools/peer_bench.py --framework $f --model $m --batch $b --data ../shared/data/cifar10-jpeg
  done; done; done > results/peers_cpu.jsonl      # torch: pip install torch==2.13.0
  python -m experiments.bench_table --data ../shared/data/cifar10-jpeg --peers results/peers_cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cifar_flax.models import MODEL_NAMES
from cifar_flax.train import describe_cpu

BATCHES = (32, 128)
# Training images/s of TF-Keras / PyTorch (oneDNN) on this 2-core CPU, as measured
# for the performance issue: {network: {batch: (keras, pytorch)}}.
PEERS = {
    "lenet5": {32: (9492, 10285), 128: (13344, 12911)},
    "alexnet8": {32: (216, 200), 128: (255, 225)},
    "vgg16": {32: (92, 92), 128: (103, 90)},
    "inception10": {32: (775, 830), 128: (1019, 1127)},
    "resnet18": {32: (56, 54), 128: (58, 58)},
}
# Steps per timed window: a few seconds of work each on this CPU.
SCAN_STEPS = {"lenet5": (100, 50), "alexnet8": (20, 8), "vgg16": (8, 3),
              "inception10": (30, 10), "resnet18": (8, 3)}
SMALL_NETWORKS = ("lenet5", "inception10")  # the issue asks 2x the faster peer for these


def bench(model: str, batch: int, steps: int, args) -> dict:
  command = [sys.executable, "-m", "cifar_flax.bench", "--model", model, "--batch", str(batch),
             "--mode", "scan", "--steps", str(steps), "--windows", str(args.windows),
             "--dtype", args.dtype]
  if args.data:
    command += ["--data", args.data]
  out = subprocess.run(command, check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def peak_gflops(repeats: int) -> list[float]:
  """The float32 4096^2 matmul peak, measured in fresh processes (median taken later)."""
  code = "from cifar_flax.bench import measure_peak_gflops as m; print(m())"
  return [float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                               text=True).stdout.split()[-1]) for _ in range(repeats)]


def load_peers(path: str) -> dict:
  """{network: {batch: (keras, pytorch)}} from `tools/peer_bench.py` JSON lines measured on
  this machine; a network or batch that file lacks keeps the issue's figure."""
  measured = {}
  for line in Path(path).read_text().splitlines():
    if line.strip():
      r = json.loads(line)
      measured.setdefault((r["model"], r["batch"]), {})[r["framework"]] = round(r["train_img_s"])
  peers = {model: dict(by_batch) for model, by_batch in PEERS.items()}
  for (model, batch), rates in measured.items():
    if set(rates) != {"keras", "torch"}:
      raise ValueError(f"{path}: {model} at batch {batch} needs both a keras and a torch record")
    peers.setdefault(model, {})[batch] = (rates["keras"], rates["torch"])
  return peers


def _options_note(record: dict) -> str:
  # Records from before cifar_flax.xla_options have no 'compiler_options'.
  options = record.get("compiler_options")
  return "".join(f", {k}={json.dumps(v)}" for k, v in (options or {}).items())


def table(records: list[dict], peak: float, command: str, machine: str,
          peers: dict = PEERS, peers_source: str = "") -> str:
  lines = [
      f"# Training and inference throughput on {records[0]['backend'].upper()} "
      f"({records[0]['cpu_count']} cores; {machine})", "",
      f"Made by `{command}` on {time.strftime('%Y-%m-%d')} "
      f"(XLA_FLAGS='{records[0]['xla_flags']}'{_options_note(records[0])}, jax {records[0]['jax']}, "
      f"{records[0]['dtype']}, conv '{records[0]['conv_resolved']}', scan mode: a chunk of "
      "steps in one `lax.scan`, as training runs). Images/s are the median of "
      f"{records[0]['windows']} timed windows after compilation and warm-up. Peers: "
      + (f"TF-Keras / PyTorch measured on this machine by `tools/peer_bench.py` ({peers_source}). "
         if peers_source else "the TF-Keras / PyTorch figures measured for the performance issue "
         "(on a 2-core machine with a ~180 GFLOP/s matmul peak). ") +
      f"FLOP/s fraction: model training FLOPs x images/s / the float32 matmul peak "
      f"({peak:.0f} GFLOP/s, median of 3, measured in the same session). "
      "'load' is the 1-minute load average at the end (2 = both cores busy).", "",
      "| network | batch | train img/s | Keras / PyTorch | vs faster peer | eval img/s "
      "| train GFLOP/s | of peak | load |",
      "|---|---|---|---|---|---|---|---|---|"]
  for r in records:
    keras, torch = peers[r["model"]][r["batch"]]
    gflops = r["train_flops_per_image"] * r["train_img_s"] / 1e9
    lines.append(f"| {r['model']} | {r['batch']} | {r['train_img_s']:,.0f} | {keras:,} / {torch:,} "
                 f"| {r['train_img_s'] / max(keras, torch):.2f}x | {r['eval_img_s']:,.0f} "
                 f"| {gflops:.1f} | {gflops / peak:.0%} | {r['loadavg_1m']:.1f} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", default=None, help="data spec (default: $CIFAR_FLAX_DATA or tfds)")
  p.add_argument("--out", default="results/bench_cpu", help="output path without extension")
  p.add_argument("--models", default=",".join(MODEL_NAMES))
  p.add_argument("--batches", default=",".join(map(str, BATCHES)), help="of 32, 128")
  p.add_argument("--windows", type=int, default=5)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--peers", default="", help="JSON lines of tools/peer_bench.py measured on this "
                 "machine (default: the performance issue's figures)")
  args = p.parse_args(argv)
  peers = load_peers(args.peers) if args.peers else PEERS
  flags = os.environ.get("XLA_FLAGS", "")
  command = ((f"XLA_FLAGS='{flags}' " if flags else "") + "python -m experiments.bench_table "
             + " ".join(argv if argv is not None else sys.argv[1:]))
  peaks = peak_gflops(3)
  print(f"matmul peak {statistics.median(peaks):.1f} GFLOP/s ({peaks})", flush=True)
  records = []
  for model in args.models.split(","):
    for batch, steps in zip(BATCHES, SCAN_STEPS[model]):
      if str(batch) not in args.batches.split(","):
        continue
      records.append(bench(model, batch, steps, args))
      print(json.dumps(records[-1]), flush=True)
  machine = describe_cpu()
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(
      {"command": command, "machine": machine,
       "peak_gflops": peaks, "records": records}, indent=1) + "\n")
  out.with_suffix(".md").write_text(table(records, statistics.median(peaks), command, machine, peers, args.peers))
  print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
  main()
