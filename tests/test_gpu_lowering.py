"""The programs a GPU would run, lowered for CUDA on this CPU-only machine.

No GPU is needed to lower: with the backend reported as 'gpu' (which is what the
implementations consult at trace time) every network's training chunk and evaluation, a
sweep group's chunk and the predictor on the shipped params are lowered for the 'cuda'
platform and their StableHLO is read. On a GPU every convolution
must be XLA's own (cuDNN), every pool a `reduce_window` (its backward a
`select_and_scatter`), with none of the CPU's fusion barriers (a conditional's predicate
would sync with the host there) and no host callback in the hot loop; bfloat16 runs must
convolve in bfloat16; a sweep's members run vmapped. The CPU's own program, lowered the same
way, fails these checks.
"""

import collections
import re

import jax
import jax.numpy as jnp
import pytest

from cifar_flax import config as config_lib, sweep, train
from cifar_flax.models import MODEL_NAMES, get_model
from cifar_flax.predict import load_predictor
from tests.fixtures_runs import SHIPPED_RUNS

BATCH, STEPS, EVAL_BATCH = 8, 2, 20
CUDA = {"lowering_platforms": ("cuda",)}


def small_config(network: str, protocol: str, **changes) -> config_lib.Config:
  return config_lib.make_config(network, protocol).replace(
      batch_size=BATCH, eval_batch_size=EVAL_BATCH, quiet=True, **changes)


def lowered_programs(config: config_lib.Config, dataset) -> dict[str, str]:
  """StableHLO text of the trainer's training chunk and evaluation, lowered for CUDA."""
  trainer = train.Trainer(config, dataset)
  state = jax.eval_shape(trainer.init_state)
  indices = jax.ShapeDtypeStruct((STEPS, BATCH), jnp.int32)
  chunk = trainer.train_chunk.trace(state, trainer.train_images, trainer.train_labels, indices)
  evaluate = trainer.evaluate.trace(train.model_variables(state), trainer.test_images,
                                    trainer.test_labels)
  return {"train": chunk.lower(**CUDA).as_text(), "evaluate": evaluate.lower(**CUDA).as_text()}


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


def assert_runs_on_the_device(text: str, ops: collections.Counter, name: str) -> None:
  """No conditional (the CPU's fusion barriers) and no custom call (host callbacks)."""
  assert ops["case"] == ops["if"] == 0, f"{name}: a conditional (CPU fusion barrier) on the GPU"
  calls = re.findall(r"custom_call @([\w.]+)", text)
  assert not calls, f"{name}: custom calls (host callbacks?) {calls}"


@pytest.fixture
def gpu_backend(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")


CASES = [(network, protocol, dtype) for network in MODEL_NAMES
         for protocol, dtype in (("recipe", "float32"), ("seed", "bfloat16"))]


@pytest.mark.parametrize("network,protocol,dtype", CASES)
def test_gpu_programs_use_xla_convolutions_and_pooling_only(gpu_backend, tiny_dataset, network,
                                                           protocol, dtype):
  config = small_config(network, protocol, dtype=dtype)
  programs = lowered_programs(config, tiny_dataset)
  layers = conv_layers(network)
  views = 2 if config.tta_flip else 1
  expected = {  # forward, and in training both gradients (the first layer's input needs none)
      "train": {"convolution": 3 * layers - 1, "pool": pools(network),
                "select_and_scatter": pools(network)},
      "evaluate": {"convolution": views * layers, "pool": views * pools(network),
                   "select_and_scatter": 0}}
  for name, text in programs.items():
    ops = stablehlo_ops(text)
    assert {op: ops[op] for op in expected[name]} == expected[name], name
    assert_runs_on_the_device(text, ops, name)
    assert convolution_operand_types(text) == {"bf16" if dtype == "bfloat16" else "f32"}, name


@pytest.mark.parametrize("network", ["lenet5", "inception10"])
def test_gpu_sweep_group_vmaps_its_members(gpu_backend, tiny_dataset, network):
  # On a GPU a sweep's members run under jax.vmap (the CPU loops them): each layer's
  # convolutions become one grouped convolution over the members (jax's own vmap rule).
  members = 3
  base = small_config(network, "seed")
  group = sweep.GroupTrainer([base.replace(learning_rate=lr) for lr in (1e-3, 3e-3, 1e-2)],
                             tiny_dataset)
  assert group.mode == "vmap"
  state = jax.eval_shape(group.init_state)
  indices = jax.ShapeDtypeStruct((members, STEPS, BATCH), jnp.int32)
  text = group.train_chunk.trace(state, group.train_images, group.train_labels,
                                 indices).lower(**CUDA).as_text()
  ops = stablehlo_ops(text)
  assert ops["convolution"] == 3 * conv_layers(network) - 1
  assert set(re.findall(r"feature_group_count = (\d+)", text)) == {str(members)}
  assert_runs_on_the_device(text, ops, "sweep group")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="reads the CPU's own program")
def test_the_cpu_programs_fail_the_gpu_checks(tiny_dataset):
  # The checks above can tell the programs apart: on the CPU, LeNet-5's convolutions are
  # banded matmuls, its pools shifted slices, and its pooled maps pass fusion barriers.
  ops = stablehlo_ops(lowered_programs(small_config("lenet5", "seed"), tiny_dataset)["train"])
  assert ops["convolution"] < 3 * conv_layers("lenet5") - 1
  assert ops["pool"] == ops["select_and_scatter"] == 0
  assert ops["case"] + ops["if"] > 0


@pytest.mark.parametrize("run_dir", SHIPPED_RUNS, ids=lambda p: p.name)
def test_gpu_predict_is_the_forward_pass_alone(gpu_backend, run_dir):
  # The importable predict (and the desktop app) on the shipped params, lowered for CUDA.
  predictor = load_predictor(run_dir)
  images = jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.uint8)
  text = predictor._probabilities.trace(predictor.variables, images).lower(**CUDA).as_text()
  ops = stablehlo_ops(text)
  network = predictor.network
  assert (ops["convolution"], ops["pool"]) == (conv_layers(network), pools(network))
  assert_runs_on_the_device(text, ops, "predict")
