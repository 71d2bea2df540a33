"""Model registry: ``get_model(name, ...)`` -> a flax.linen Module.

All networks take NHWC float images (B, 32, 32, 3), ``train: bool``, and return
float32 logits. Variables are ``{'params', 'batch_stats'}`` ('batch_stats'
absent for lenet5); dropout draws from the 'dropout' rng.
"""

from __future__ import annotations

from flax import linen as nn

from .alexnet import AlexNet8
from .inception import Inception10
from .layers import ACTIVATIONS, CONV_IMPLS, POOL_IMPLS, check_impl, count_params, get_activation, get_dtype
from .lenet import LeNet5
from .resnet import ResNet18
from .vgg import VGG16

MODEL_NAMES = ('lenet5', 'alexnet8', 'vgg16', 'inception10', 'resnet18')
ALIASES = {'googlenet': 'inception10'}
_MODELS = {'lenet5': LeNet5, 'alexnet8': AlexNet8, 'vgg16': VGG16,
           'inception10': Inception10, 'resnet18': ResNet18}
DEFAULT_ACTIVATION = {'lenet5': 'sigmoid'}


def canonical_name(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in _MODELS:
        raise ValueError(f'unknown model {name!r}; valid: {list(MODEL_NAMES) + sorted(ALIASES)}')
    return name


def network_options(name: str) -> set[str]:
    """The keyword options the network's module takes (e.g. 'dropout' where it has Dropout)."""
    return set(_MODELS[canonical_name(name)].__dataclass_fields__) - {'parent', 'name'}


def get_model(name: str, *, num_classes: int = 10, activation: str | None = None,
              dtype: str = 'float32', conv: str = 'auto', pool: str = 'auto', **options) -> nn.Module:
    """Build a network by name. ``options`` are network specific (inception10: bn='batch'|'frozen')."""
    name = canonical_name(name)
    activation = activation or DEFAULT_ACTIVATION.get(name, 'relu')
    get_activation(activation)  # fail early with the list of valid names
    check_impl(conv, CONV_IMPLS, 'conv')
    check_impl(pool, POOL_IMPLS, 'pool')
    cls = _MODELS[name]
    unknown = set(options) - network_options(name)
    if unknown:
        raise ValueError(f'unknown options {sorted(unknown)} for model {name!r}')
    return cls(num_classes=num_classes, activation=activation, dtype=get_dtype(dtype),
               conv=conv, pool=pool, **options)


__all__ = ['MODEL_NAMES', 'ALIASES', 'ACTIVATIONS', 'CONV_IMPLS', 'POOL_IMPLS', 'get_model',
           'canonical_name', 'count_params', 'network_options', 'AlexNet8', 'Inception10', 'LeNet5', 'ResNet18', 'VGG16']
