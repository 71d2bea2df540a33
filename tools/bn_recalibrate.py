"""How much of a run's test accuracy its BatchNorm running statistics cost.

  python tools/bn_recalibrate.py ckpt/alexnet8-seed --data ../shared/data/cifar10-jpeg

Evaluates the run's exported params on the test set twice: with the running
statistics it trained (what every table reports) and with statistics
re-estimated from the first --images training images in train-mode passes.
A diagnostic only; it changes no files.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from cifar_flax import checkpoint, data as data_lib
from cifar_flax.models import get_model
from cifar_flax.models.layers import BN_MOMENTUM


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("run_dir")
  parser.add_argument("--data", default=None)
  parser.add_argument("--images", type=int, default=4000, help="training images, in slices of 1000")
  args = parser.parse_args()
  bundle = checkpoint.load_inference(args.run_dir)
  if "batch_stats" not in bundle.variables:
    raise SystemExit(f"{args.run_dir}: this network has no BatchNorm statistics")
  dataset = data_lib.load_cifar10(args.data)
  model = get_model(bundle.network, **bundle.model_options)
  norm = lambda x: data_lib.normalize(jnp.asarray(x), bundle.normalization, jnp.float32)
  predict = jax.jit(lambda v, x: jnp.argmax(model.apply(v, norm(x), train=False), -1))

  def accuracy(variables) -> float:
    hits = sum(int((np.asarray(predict(variables, dataset.test_images[i:i + 500]))
                    == dataset.test_labels[i:i + 500]).sum())
               for i in range(0, len(dataset.test_images), 500))
    return hits / len(dataset.test_images)

  @jax.jit
  def updated_stats(variables, x):
    _, updates = model.apply(variables, norm(x), train=True, mutable=["batch_stats"],
                             rngs={"dropout": jax.random.PRNGKey(0)})
    return updates["batch_stats"]

  running = bundle.variables["batch_stats"]
  # One train-mode pass moves each average by (1 - momentum) towards the batch's statistic.
  estimates = [jax.tree.map(lambda new, old: (new - BN_MOMENTUM * old) / (1 - BN_MOMENTUM),
                            updated_stats(bundle.variables, dataset.train_images[i:i + 1000]), running)
               for i in range(0, args.images, 1000)]
  fresh = jax.tree.map(lambda *a: sum(a) / len(a), *estimates)
  print(f"{args.run_dir} (epoch {bundle.epoch}): test accuracy with its running statistics "
        f"{accuracy(bundle.variables):.4f}, with statistics re-estimated from {args.images} "
        f"training images {accuracy({**bundle.variables, 'batch_stats': fresh}):.4f}")


if __name__ == "__main__":
  main()
