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
Other backends compile with their defaults.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

CPU_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


def compiler_options(backend: str | None = None) -> dict[str, Any] | None:
  """XLA options for ``backend`` (default: JAX's default backend); None: XLA's defaults."""
  backend = backend or jax.default_backend()
  return dict(CPU_COMPILER_OPTIONS) if backend == "cpu" else None


def jit(fun: Callable, **jit_kwargs) -> Callable:
  """`jax.jit` with `compiler_options()` for the default backend. Options passed to a
  later `.lower(...).compile(compiler_options=...)` override these key by key."""
  return jax.jit(fun, compiler_options=compiler_options(), **jit_kwargs)
