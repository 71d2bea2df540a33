"""The programs a GPU would run, lowered for CUDA on this CPU-only machine.

No GPU is needed to lower: with the backend reported as 'gpu' (which is what the
implementations consult at trace time) every network's training chunk and evaluation are
lowered for the 'cuda' platform and their StableHLO is read. On a GPU every convolution
must be XLA's own (cuDNN), every pool a `reduce_window` (its backward a
`select_and_scatter`), with none of the CPU's fusion barriers (a conditional's predicate
would sync with the host there) and no host callback in the hot loop; bfloat16 runs must
convolve in bfloat16. The CPU's own program, lowered the same way, fails these checks.
"""

import collections
import re

import jax
import jax.numpy as jnp
import pytest

from cifar_flax import config as config_lib, train
from cifar_flax.models import MODEL_NAMES, get_model

BATCH, STEPS, EVAL_BATCH = 8, 2, 16


def lowered_programs(network: str, protocol: str, dtype: str) -> dict[str, str]:
  """StableHLO text of the training chunk and of evaluation, lowered for CUDA."""
  config = config_lib.make_config(network, protocol).replace(
      dtype=dtype, batch_size=BATCH, eval_batch_size=EVAL_BATCH)
  model = get_model(network, **config.model_options())
  tx = train.make_optimizer(config, steps_per_epoch=100)
  state = jax.eval_shape(lambda: train.create_train_state(config, model, tx))
  images = jax.ShapeDtypeStruct((64, 32, 32, 3), jnp.uint8)
  labels = jax.ShapeDtypeStruct((64,), jnp.int32)
  indices = jax.ShapeDtypeStruct((STEPS, BATCH), jnp.int32)
  chunk = jax.jit(train.make_train_chunk(model, tx, config))
  evaluate = jax.jit(train.make_evaluate(model, config))
  variables = train.model_variables(state)
  cuda = {"lowering_platforms": ("cuda",)}
  return {"train": chunk.trace(state, images, labels, indices).lower(**cuda).as_text(),
          "evaluate": evaluate.trace(variables, images, labels).lower(**cuda).as_text()}


def conv_layers(network: str) -> int:
  """How many convolution kernels (4-D params) the network has."""
  params = jax.eval_shape(lambda: get_model(network).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))["params"]
  return sum(leaf.ndim == 4 for leaf in jax.tree.leaves(params))


def stablehlo_ops(text: str) -> collections.Counter:
  ops = collections.Counter(re.findall(r"stablehlo\.([a-z_]+)", text))
  # Pools are the reduce_windows over 4-D maps (a schedule's cumprod is one over a vector);
  # a reduce_window's operand types follow its body, at the first "}) : (".
  after_each = text.split('"stablehlo.reduce_window"')[1:]
  ops["pool"] = sum(bool(re.match(r"\(tensor<\d+x\d+x\d+x\d+x", rest.split("}) : ", 1)[1]))
                    for rest in after_each)
  return ops


def convolution_operand_types(text: str) -> set[str]:
  """Element types of the convolutions' first operands."""
  return set(re.findall(r"stablehlo\.convolution\(.*?\).*?: \(tensor<[0-9x]+x(\w+)>", text))


def pools(network: str) -> int:
  return {"lenet5": 2, "alexnet8": 3, "vgg16": 5, "inception10": 4, "resnet18": 0}[network]


@pytest.fixture
def gpu_backend(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")


CASES = [(network, protocol, dtype) for network in MODEL_NAMES
         for protocol, dtype in (("recipe", "float32"), ("seed", "bfloat16"))]


@pytest.mark.parametrize("network,protocol,dtype", CASES)
def test_gpu_programs_use_xla_convolutions_and_pooling_only(gpu_backend, network, protocol, dtype):
  programs = lowered_programs(network, protocol, dtype)
  layers = conv_layers(network)
  views = 2 if config_lib.make_config(network, protocol).tta_flip else 1
  expected = {  # forward, and in training both gradients (the first layer's input needs none)
      "train": {"convolution": 3 * layers - 1, "pool": pools(network),
                "select_and_scatter": pools(network)},
      "evaluate": {"convolution": views * layers, "pool": views * pools(network),
                   "select_and_scatter": 0}}
  for name, text in programs.items():
    ops = stablehlo_ops(text)
    assert {op: ops[op] for op in expected[name]} == expected[name], name
    assert ops["case"] == ops["if"] == 0, f"{name}: a conditional (CPU fusion barrier) on the GPU"
    calls = re.findall(r"custom_call @([\w.]+)", text)
    assert not calls, f"{name}: custom calls (host callbacks?) {calls}"
    assert convolution_operand_types(text) == {"bf16" if dtype == "bfloat16" else "f32"}, name


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="reads the CPU's own program")
def test_the_cpu_programs_fail_the_gpu_checks():
  # The checks above can tell the programs apart: on the CPU, LeNet-5's convolutions are
  # banded matmuls, its pools shifted slices, and its pooled maps pass fusion barriers.
  ops = stablehlo_ops(lowered_programs("lenet5", "seed", "float32")["train"])
  assert ops["convolution"] < 3 * conv_layers("lenet5") - 1
  assert ops["pool"] == ops["select_and_scatter"] == 0
  assert ops["case"] + ops["if"] > 0
