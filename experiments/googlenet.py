"""GoogLeNet (the small Inception net, `inception10`) on CIFAR-10: `python -m experiments.googlenet --protocol seed|recipe`.

Only this network's defaults live here; the trainer is `cifar_flax.train`.
"""

import sys

from cifar_flax.experiment import main

# The `recipe` protocol's choices for this network, on top of config.RECIPE_BASE.
# Ordinary BatchNorm (not the original's frozen quirk); a small net likes more steps.
RECIPE = dict(learning_rate=0.1, batch_size=64)

if __name__ == "__main__":
  sys.exit(main("inception10", RECIPE))
