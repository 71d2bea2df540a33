"""The XLA options this project's programs compile with, and `jit`, which applies them.

On the CPU, copy insertion runs with region analysis: without it XLA:CPU adds a copy of
every buffer that crosses control flow it cannot see through, i.e. the scan's carried
state (parameters, optimizer state) each step and the output of every fusion barrier's
conditional (`models.layers.materialize`). With it, LeNet-5's compiled training chunk
keeps 15 of its 31 copies and GoogLeNet's 113 of 270; the arithmetic is the same (the same
first-chunk loss to the last bit). Training throughput with it against without, in one
process (`tools/ab_bench.py`, rounds faster in brackets; an A/A pair in the same runs
gave 1.03x and 0.94x): LeNet-5 at batch 128 1.06x (9 of 11) and 1.056x (11 of 15), at 32
1.075x (7 of 11), VGG16 at 32 1.085x (5 of 7), AlexNet 1.01x / 1.06x, ResNet-18 at 32
1.00x, GoogLeNet 0.94-0.97x, level with its A/A pair. Evaluating 5,000 test images
(`train.make_evaluate`, alternating calls): LeNet-5 1.01x, GoogLeNet 1.00x, AlexNet 0.99x.

On a GPU, XLA by default may pick non-deterministic kernels (atomics; convolution
algorithms chosen by timing): on an H200 two identical LeNet-5 runs, each in its own
process, differed from the first epoch (train loss 2.17374124 against 2.17374138), a
resumed run differed from the straight one, and a looped sweep member from its separate fit.
With non-deterministic ops excluded (set there for the whole process, in XLA_FLAGS; the
per-program form below has not run on a GPU yet) the pairs were identical and those tests
passed (results/gpu_h200_b78a40c). Exact resume needs it; its cost in speed is unmeasured.
Other backends compile with their defaults.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

BACKEND_COMPILER_OPTIONS = {
    "cpu": {"xla_cpu_copy_insertion_use_region_analysis": True},
    "gpu": {"xla_gpu_exclude_nondeterministic_ops": True},
}


def compiler_options(backend: str | None = None) -> dict[str, Any] | None:
  """XLA options for ``backend`` (default: JAX's default backend); None: XLA's defaults."""
  options = BACKEND_COMPILER_OPTIONS.get(backend or jax.default_backend())
  return dict(options) if options else None


def jit(fun: Callable, **jit_kwargs) -> Callable:
  """`jax.jit` with `compiler_options()` for the default backend. Options passed to a
  later `.lower(...).compile(compiler_options=...)` override these key by key."""
  return jax.jit(fun, compiler_options=compiler_options(), **jit_kwargs)
