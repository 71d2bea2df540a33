"""ResNet-18 on CIFAR-10: `python -m experiments.resnet18 --protocol seed|recipe`.

Only this network's defaults live here; the trainer is `cifar_flax.train`.
"""

import sys

from cifar_flax.experiment import main

# The `recipe` protocol's choices for this network, on top of config.RECIPE_BASE.
# The standard CIFAR ResNet recipe: SGD+Nesterov, one-cycle, wd 5e-4, smoothing 0.1.
RECIPE = dict(learning_rate=0.1)

if __name__ == "__main__":
  sys.exit(main("resnet18", RECIPE))
