"""Shared fixtures: tiny synthetic CIFAR-shaped data, so tests never need the
real dataset or the network."""

import os

import numpy as np
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


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
