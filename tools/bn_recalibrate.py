"""How much of a run's test accuracy its BatchNorm running statistics cost.

  python tools/bn_recalibrate.py ckpt/alexnet8-seed --data ../shared/data/cifar10-jpeg

Evaluates the run's exported params on the test set twice, with the run's own
evaluation (`train.make_evaluate` under its config.json): with the running
statistics it trained (what every table reports) and with statistics
re-estimated from the first --images training images in train-mode passes.
A diagnostic only; it changes no files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp

from cifar_flax import checkpoint, data as data_lib, train
from cifar_flax.config import load_config
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
  config = load_config(Path(args.run_dir) / "config.json")
  dataset = data_lib.load_cifar10(args.data)
  model = get_model(bundle.network, **bundle.model_options)
  evaluate = jax.jit(train.make_evaluate(model, config))
  test_images, test_labels = train.pad_to_multiple(dataset.test_images, dataset.test_labels,
                                                   config.eval_batch_size)

  def accuracy(variables) -> float:
    _, correct = evaluate(variables, test_images, test_labels)
    return int(correct) / len(dataset.test_images)

  @jax.jit
  def updated_stats(variables, x):
    x = data_lib.normalize(jnp.asarray(x), bundle.normalization, jnp.float32)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
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
