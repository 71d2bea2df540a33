"""tools/peer_bench.py: the Keras and PyTorch networks match ours, and a tiny run gives a record.
The torch tests are skipped where torch is not installed (it is not a project dependency)."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_flax.models import MODEL_NAMES, count_params, get_model

SPEC = importlib.util.spec_from_file_location(
    "peer_bench", Path(__file__).resolve().parents[1] / "tools" / "peer_bench.py")
peer_bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(peer_bench)

KEYS = {"framework", "model", "batch", "train_img_s", "params", "steps", "windows", "threads", "version"}


def flax_params(name):
  """Trainable parameter count of our network, from shapes only (nothing computed)."""
  net = get_model(name)
  key = jax.random.key(0)
  variables = jax.eval_shape(lambda: net.init({"params": key, "dropout": key},
                                              jnp.zeros((1, 32, 32, 3)), train=False))
  return count_params(variables["params"])


@pytest.fixture(scope="module")
def ours():
  return {name: flax_params(name) for name in MODEL_NAMES}


def tiny_run(framework):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 16).astype(np.int32)
  return peer_bench.run_peer_bench(framework, "lenet5", 4, images, labels, steps=1, windows=1, warmup=1)


def test_same_padding_matches_tf_output_size():
  assert peer_bench.same_padding(32, 3, 1) == 1 and peer_bench.same_padding(32, 3, 2) == 1
  assert peer_bench.same_padding(32, 1, 2) == 0 and peer_bench.same_padding(2, 2, 2) == 0
  with pytest.raises(ValueError):
    peer_bench.same_padding(5, 2, 1)  # even kernel, stride 1: TF pads one side only


def test_time_training_calibrates_steps_to_the_window():
  calls = []
  result = peer_bench.time_training(lambda images, labels: calls.append(1) or 0.0, [(None, np.zeros(4))],
                                    float, steps=0, windows=2, warmup=1, window_seconds=0.01)
  assert result["steps"] >= 1 and result["train_img_s"] > 0
  assert len(calls) > 1 + 2 * result["steps"]  # warm-up, calibration, two windows


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_keras_params_match_ours(ours, name):
  pytest.importorskip("tensorflow")
  assert peer_bench.keras_params(peer_bench.keras_model(name)) == ours[name]


def test_keras_tiny_run():
  pytest.importorskip("tensorflow")
  record = tiny_run("keras")
  assert KEYS <= set(record) and record["framework"] == "keras" and record["model"] == "lenet5"
  assert record["params"] == 62_006 and record["train_img_s"] > 0
  assert record["keras_mode"] in peer_bench.KERAS_MODES
  assert record["train_img_s"] == max(record["keras_rates"].values())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_torch_params_and_output_match_ours(ours, name):
  torch = pytest.importorskip("torch")
  net = peer_bench.torch_model(name).to(memory_format=torch.channels_last).eval()
  assert peer_bench.torch_params(net) == ours[name]
  with torch.no_grad():  # the modules' input sizes follow the tracked shapes
    assert net(torch.zeros(1, 3, 32, 32).to(memory_format=torch.channels_last)).shape == (1, 10)


def test_torch_tiny_run():
  pytest.importorskip("torch")
  record = tiny_run("torch")
  assert KEYS <= set(record) and record["framework"] == "torch" and record["batch"] == 4
  assert record["params"] == 62_006 and record["train_img_s"] > 0 and record["steps"] == 1
