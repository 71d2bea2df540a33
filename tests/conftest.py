"""Shared fixtures: tiny synthetic CIFAR-shaped data, so tests never need the
real dataset or the network."""

import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


def _share_compiled_programs():
  """Tests compile many programs more than once: a trainer's chunk again on resume, a sweep's
  members fitted one by one to compare, the same model in several tests, command-line children.
  A persistent compilation cache private to this session lets XLA's output be reused
  (tests/test_train.py + test_sweep.py: 587 -> 393 s). Set in the environment, which jax reads
  when imported, so that child processes and xdist workers share it; a cache the caller (or a
  parent test session) chose is kept, with its settings."""
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  cache = tempfile.mkdtemp(prefix="cifar_flax_tests_xla_cache_")
  atexit.register(shutil.rmtree, cache, ignore_errors=True)
  settings = {"jax_compilation_cache_dir": cache,
              "jax_persistent_cache_min_compile_time_secs": 0.2,
              "jax_persistent_cache_min_entry_size_bytes": 0}
  import jax  # set here too, in case a plugin imported jax before the environment was set
  for name, value in settings.items():
    os.environ[name.upper()] = str(value)
    jax.config.update(name, value)


_share_compiled_programs()


def _full_float32_precision():
  """The tests compare implementations (XLA's convolution against the GEMM forms, bfloat16
  against float32) within float32 tolerances. On NVIDIA GPUs since Ampere, JAX's default
  precision computes float32 matmuls and convolutions as TF32 (10-bit mantissas), about 1e-3
  off, which training tolerates but those comparisons would not; on the CPU this setting
  changes nothing (a ResNet-18's outputs and gradients are bitwise the same). Set in the
  environment too, for xdist workers and child processes."""
  import jax
  os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
  jax.config.update("jax_default_matmul_precision", os.environ["JAX_DEFAULT_MATMUL_PRECISION"])


_full_float32_precision()


def make_tiny_dataset(num_train=256, num_test=100, seed=0, noise=40):
  """Ten classes, each a fixed random colour pattern plus noise: learnable in a
  few hundred steps, yet real uint8 images with canonical class names."""
  from cifar_flax.data import CLASS_NAMES, Cifar10
  rng = np.random.default_rng(seed)
  templates = rng.integers(0, 256, size=(10, 32, 32, 3))

  def split(n):
    labels = np.arange(n, dtype=np.int32) % 10
    rng.shuffle(labels)
    images = templates[labels] + rng.normal(0, noise, size=(n, 32, 32, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels

  train_images, train_labels = split(num_train)
  test_images, test_labels = split(num_test)
  return Cifar10(train_images=train_images, train_labels=train_labels, test_images=test_images,
                 test_labels=test_labels, class_names=tuple(CLASS_NAMES))


@pytest.fixture(scope="session")
def tiny_dataset():
  return make_tiny_dataset()
