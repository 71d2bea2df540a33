"""Desktop CIFAR-10 classifier built with Dear PyGui: ``python -m ui [image] [--model NAME]``."""
