"""The command line shared by every experiment module (`python -m experiments.<network>`)."""

from __future__ import annotations

import argparse
import sys

from cifar_flax.config import add_config_arguments, make_config, overrides_from_args


def parse_config(network: str, recipe: dict, argv=None):
  parser = argparse.ArgumentParser(
      prog=f"python -m experiments.{network}",
      description=f"Train {network} on CIFAR-10, evaluate every epoch, checkpoint, resume and plot.")
  add_config_arguments(parser)
  parser.add_argument("--fresh", action="store_true",
                      help="start over instead of resuming the run folder")
  args = parser.parse_args(argv)
  overrides = overrides_from_args(args)
  protocol = overrides.pop("protocol", "seed")
  return make_config(network, protocol, recipe, **overrides), args.fresh


def main(network: str, recipe: dict, argv=None) -> int:
  config, fresh = parse_config(network, recipe, argv)
  from cifar_flax import train  # imports jax: after parsing, so --help is fast.
  try:
    train.maybe_initialize_distributed()
    history = train.fit(config, fresh=fresh)
  except (ValueError, FileNotFoundError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  if history["status"] == "diverged":
    return 1
  last = history["epochs"][-1]
  print(f"{network} ({config.protocol}): test accuracy {last['test_accuracy']:.4f} after "
        f"epoch {last['epoch']}; run folder {config.run_dir()}")
  return 0
