"""AlexNet (small CIFAR variant) on CIFAR-10: `python -m experiments.alexnet8 --protocol seed|recipe`.

Only this network's defaults live here; the trainer is `cifar_flax.train`.
"""

import sys

from cifar_flax.experiment import main

# The `recipe` protocol's choices for this network, on top of config.RECIPE_BASE.
# Dropout 0.5 already regularises the dense layers; a gentler peak rate.
RECIPE = dict(learning_rate=0.05)

if __name__ == "__main__":
  sys.exit(main("alexnet8", RECIPE))
