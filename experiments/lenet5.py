"""LeNet-5 on CIFAR-10: `python -m experiments.lenet5 --protocol seed|recipe`.

Only this network's defaults live here; the trainer is `cifar_flax.train`.
"""

import sys

from cifar_flax.experiment import main

# The `recipe` protocol's choices for this network, on top of config.RECIPE_BASE.
# A 62k-parameter net underfits under strong regularisation: ReLU instead of
# sigmoid, no label smoothing, a smaller batch for more steps.
RECIPE = dict(activation="relu", learning_rate=0.05, batch_size=64, label_smoothing=0.0)

if __name__ == "__main__":
  sys.exit(main("lenet5", RECIPE))
