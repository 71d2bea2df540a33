"""cifar-flax: classic CNNs on CIFAR-10 in JAX/Flax."""
