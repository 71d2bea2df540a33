"""Where a training step's time goes: XLA's ops, timed by the profiler, summed per op and layer.

  python tools/profile_step.py --model inception10 --batch 128 --steps 10 \\
      --data ../shared/data/cifar10-jpeg [--conv xla] [--top 30] [--json prof.json]

Compiles `bench --mode scan`'s training chunk (STEPS real Adam steps in one `lax.scan`), calls
it twice to warm up and --calls times for the wall time a step, then once more under
`jax.profiler.trace`. On the CPU the trace's events are the executed HLO instructions (each
thunk; not tried on a GPU, whose kernel events may be named otherwise); each is joined with the
compiled module's text: output shape, kind (`matmul`: dots, convolutions and YNNPACK fusions,
`elementwise`: every other fusion and op) and the layer its metadata names, forward or
backward. Control instructions (while, conditional, call) are left out of the sums: their
events time the dispatch, their bodies' ops are counted themselves. Asynchronous thunks
(XLA:CPU's convolutions, when its thread pool takes them) run beside other ops: their own events
time only the dispatch, so the ops that finished well after their event are listed apart with
their latency from dispatch to completion (which includes waiting behind other work).

Prints the top ops, the per-layer totals (forward / backward) and the totals by kind and by the
output's minor dimension (XLA:CPU's loop fusions run 2-3x slower per element over rows of 16 floats
than of 256; see docs/performance.md). Times are per step: a traced call's total over STEPS.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

CONTROL_OPCODES = ("while", "conditional", "call")
ASYNC_END = "end: "
ASYNC_LATENCY_RATIO = 2
MATMUL_OPCODES = ("dot", "convolution")
# '%name = f32[128,16]{1,0} opcode(' or '%name = (f32[..], s32[..]) fusion(': the first shape is
# the (first) output's.
INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+) = \(?(?P<shape>\w+\[[\d,]*\])[^=]*?\s(?P<opcode>[\w\-]+)\(",
    re.M)
OP_NAME = re.compile(r'op_name="([^"]*)"')
# jax names the forward pass jvp(Model) and the backward transpose(jvp(Model)).
MODEL_SCOPE = re.compile(r"(transpose\()?jvp\((\w+)\)\)?/(.*)")
FLAX_MODULE = re.compile(r"[A-Z]\w*_\d+$")  # Conv_0, InceptionBlock_2: scopes of submodules


def parse_instructions(hlo_text: str) -> dict[str, dict]:
  """HLO instruction name -> {"shape", "opcode", "kind", "layer", "pass"}."""
  instructions = {}
  for line in hlo_text.splitlines():
    match = INSTRUCTION.match(line)
    if not match:
      continue
    opcode = match["opcode"]
    if opcode in CONTROL_OPCODES:
      kind = "control"
    elif opcode in MATMUL_OPCODES or (opcode == "fusion" and "__ynn_fusion" in line):
      kind = "matmul"
    else:
      kind = "elementwise"
    op_name = OP_NAME.search(line)
    layer, pass_ = describe_op_name(op_name[1] if op_name else "")
    instructions[match["name"]] = {"shape": match["shape"], "opcode": opcode, "kind": kind,
                                   "layer": layer, "pass": pass_}
  return instructions


def describe_op_name(op_name: str) -> tuple[str, str]:
  """'jit(train_chunk)/while/body/closed_call/transpose(jvp(LeNet5))/Conv_0/dot_general'
  -> ('Conv_0', 'backward'): the Flax submodules on the path; ops outside the model (loss,
  optimizer, data) -> ('(outside the model)', 'other')."""
  match = MODEL_SCOPE.search(op_name)  # the leftmost: transpose(jvp(...)) before its inner jvp(
  if not match:
    return "(outside the model)", "other"
  modules = [part for part in match[3].split("/") if FLAX_MODULE.match(part)]
  return "/".join(modules) or "(model, top level)", "backward" if match[1] else "forward"


def minor_dim(shape: str) -> str:
  dims = shape[shape.index("[") + 1:-1]
  return dims.rsplit(",", 1)[-1] if dims else "scalar"


def trace_events(trace_dir: Path) -> list[dict]:
  files = sorted(trace_dir.glob("**/*.trace.json.gz"))
  if not files:
    raise RuntimeError(f"the profiler wrote no perfetto trace under {trace_dir}")
  with gzip.open(files[-1]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return [e for e in events if e.get("ph") == "X" and "dur" in e]


def op_durations(events: list[dict]) -> tuple[collections.Counter, dict[str, float]]:
  """Event name -> summed own duration (microseconds), and, for the ones that finished late, the
  summed latency from dispatch to completion. XLA:CPU logs each thunk's run as an event and, for
  many, its completion as 'end: NAME' (the n-th paired with the n-th run). A synchronous thunk
  ends as its event does; an asynchronous one (XLA:CPU's convolutions, when the thread pool
  takes them) returns from its event after the dispatch, its work runs beside other ops and ends
  later, so its own event misses its work and its latency includes waiting behind other work:
  neither is its share of the step. Late: latency over ASYNC_LATENCY_RATIO x the own duration
  (an op whose completion was only noted late is listed too)."""
  runs, ends = collections.defaultdict(list), collections.defaultdict(list)
  for event in events:
    name = event["name"]
    if name.startswith(ASYNC_END):
      ends[name[len(ASYNC_END):]].append(event)
    else:
      runs[name].append(event)
  durations, latencies = collections.Counter(), {}
  by_time = lambda e: e["ts"]
  for name, started in runs.items():
    durations[name] = sum(e["dur"] for e in started)
    done = ends.get(name)
    if done and len(done) == len(started):
      latency = sum(end["ts"] + end["dur"] - start["ts"]
                    for start, end in zip(sorted(started, key=by_time), sorted(done, key=by_time)))
      if latency > ASYNC_LATENCY_RATIO * durations[name]:
        latencies[name] = latency
  return durations, latencies


def summarize(events: list[dict], instructions: dict[str, dict], steps: int) -> dict:
  """Per-step milliseconds: per op, per (layer, pass), per kind, per (kind, minor dim), from the
  ops' own events; asynchronous ops' dispatch-to-completion latencies apart."""
  durations, latencies = op_durations(events)
  per_op = collections.Counter()
  for name, microseconds in durations.items():
    info = instructions.get(name)
    if info is not None and info["kind"] != "control":
      per_op[name] = microseconds / 1000 / steps
  layers = collections.defaultdict(lambda: {"forward": 0.0, "backward": 0.0, "other": 0.0})
  kinds, rows = collections.Counter(), collections.Counter()
  for name, ms in per_op.items():
    info = instructions[name]
    layers[info["layer"]][info["pass"]] += ms
    kinds[info["kind"]] += ms
    rows[f"{info['kind']}, minor dim {minor_dim(info['shape'])}"] += ms
  ops = [{"op": name, "ms": round(ms, 4), **instructions[name]} for name, ms in per_op.most_common()]
  pending = sorted(((latencies[name] / 1000 / steps, name) for name in per_op if name in latencies), reverse=True)
  return {"ops": ops,
          "async_ops": [{"op": name, "latency_ms": round(ms, 4), **instructions[name]} for ms, name in pending],
          "layers": {k: {p: round(v, 4) for p, v in passes.items()}
                     for k, passes in sorted(layers.items(), key=lambda kv: -sum(kv[1].values()))},
          "kinds": {k: round(v, 4) for k, v in kinds.most_common()},
          "minor_dims": {k: round(v, 4) for k, v in rows.most_common()},
          "ops_ms": round(sum(per_op.values()), 4)}


def profile(model: str, batch: int, steps: int, calls: int, dataset, conv: str = "auto",
            dtype: str = "float32", matmul_precision: str = "default") -> dict:
  import jax

  from cifar_flax import bench

  config, net, tx, chunk_args = bench.scan_chunk_setup(model, batch, steps, dataset, conv, dtype, matmul_precision)
  compiled, state = bench.compile_scan_chunk(config, net, tx, chunk_args)

  def call(state):
    state, sums = compiled(state, *chunk_args)
    return jax.block_until_ready((state, sums))[0]

  for _ in range(2):
    state = call(state)
  step_ms = []
  for _ in range(calls):
    start = time.perf_counter()
    state = call(state)
    step_ms.append((time.perf_counter() - start) * 1000 / steps)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      call(state)
    events = trace_events(Path(trace_dir))
  summary = summarize(events, parse_instructions(compiled.as_text()), steps)
  return {"model": model, "batch": batch, "conv": conv, "steps": steps, "backend": jax.default_backend(),
          "step_ms": round(statistics.median(step_ms), 3), "step_ms_calls": [round(t, 3) for t in step_ms],
          **summary}


def report(result: dict, top: int) -> str:
  lines = [f"{result['model']} batch {result['batch']} (conv {result['conv']}) on {result['backend']}: "
           f"{result['step_ms']:.2f} ms a step (median of {len(result['step_ms_calls'])} calls "
           f"of {result['steps']} steps); the traced call's ops' own events {result['ops_ms']:.2f} "
           f"ms a step", "", f"top {top} ops (ms a step):"]
  describe = lambda op: f"{op['shape']:24s} {op['pass']:8s} {op['layer']}  [{op['op']}]"
  lines += [f"  {op['ms']:8.3f}  {op['kind']:11s} {describe(op)}" for op in result["ops"][:top]]
  if result["async_ops"]:
    lines += ["", f"ops that finished well after their event (asynchronous: their own events above "
                  f"may miss part of their work), dispatch to completion, waiting included (ms a step; "
                  f"top {top}):"]
    lines += [f"  {op['latency_ms']:8.3f}  {op['kind']:11s} {describe(op)}" for op in result["async_ops"][:top]]
  lines += ["", f"layers (ms a step: forward / backward; top {top}):"]
  for layer, passes in list(result["layers"].items())[:top]:
    extra = f" (+{passes['other']:.2f})" if passes["other"] else ""
    lines.append(f"  {passes['forward']:8.3f} / {passes['backward']:8.3f}{extra}  {layer}")
  lines += ["", "by kind: " + ", ".join(f"{k} {v:.2f}" for k, v in result["kinds"].items()),
            f"by kind and output minor dim (top {top}):"]
  lines += [f"  {v:8.3f}  {k}" for k, v in list(result["minor_dims"].items())[:top]]
  return "\n".join(lines)


def main(argv=None) -> None:
  from cifar_flax.config import DTYPES, MATMUL_PRECISIONS
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=10, help="training steps per call (one lax.scan)")
  p.add_argument("--calls", type=int, default=5, help="timed calls before the traced one")
  p.add_argument("--top", type=int, default=30, help="how many ops to list")
  p.add_argument("--conv", default="auto", help="convolution implementation (auto, xla, gemm, hybrid, onednn)")
  p.add_argument("--data", default=None, help="data spec (see cifar_flax.data)")
  p.add_argument("--dtype", choices=DTYPES, default="float32")
  p.add_argument("--matmul-precision", default="default", choices=MATMUL_PRECISIONS,
                 help="jax.default_matmul_precision of the programs")
  p.add_argument("--json", type=Path, default=None, help="also write every op and total here")
  args = p.parse_args(argv)
  if min(args.batch, args.steps, args.calls, args.top) < 1:
    p.error("--batch, --steps, --calls and --top must be positive")
  from cifar_flax import data as data_lib
  from cifar_flax.models import CONV_IMPLS, canonical_name
  from cifar_flax.models.layers import check_impl
  try:
    model = canonical_name(args.model)
    check_impl(args.conv, CONV_IMPLS, "conv")
  except ValueError as error:
    p.error(str(error))
  result = profile(model, args.batch, args.steps, args.calls, data_lib.load_cifar10(args.data), args.conv,
                   args.dtype, args.matmul_precision)
  print(report(result, args.top))
  if args.json:
    args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
  main()
