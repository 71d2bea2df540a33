"""One configuration type for every run, and the command line built from it.

A `Config` is plain, frozen data: it is printed at start, saved with the run
(`config.json`) and compared on resume. Two protocols give the defaults:

* ``seed``: the original TF-Keras project's training, to reproduce its numbers
  (Adam 1e-3, batch 32, 10 epochs, inputs in [0, 1], no augmentation, constant
  learning rate; GoogLeNet with its frozen-BatchNorm quirk).
* ``recipe``: this project's best training for the epoch budget. The generic
  part lives here; each network's own choices live in its experiment module.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path

OPTIMIZERS = ("sgd", "rmsprop", "adagrad", "adadelta", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "onecycle")
LOSSES = ("cross_entropy", "mse", "bce")
ACTIVATION_NAMES = ("relu", "sigmoid", "tanh", "gelu", "silu", "elu", "leaky_relu")
PROTOCOLS = ("seed", "recipe")
NORMALIZATIONS = ("unit", "standard")
DTYPES = ("float32", "bfloat16")
# jax.default_matmul_precision for the run's programs ('default': the process's, float32 on the
# CPU, TF32 on recent NVIDIA GPUs). 'bfloat16' on the CPU: oneDNN's convolutions multiply float32
# operands in bfloat16 (AMX where the CPU has it; models/onednn.py).
MATMUL_PRECISIONS = ("default", "bfloat16", "tensorfloat32", "float32")
CONV_IMPLS = ("auto", "xla", "gemm")
BN_MODES = ("batch", "frozen")

# Fields that may change between a run and its resumption: where the data
# lives, how output is shown and how often it is saved do not change the maths.
RESUME_SAFE_FIELDS = ("data", "workdir", "quiet", "steps_per_call", "checkpoint_every",
                      "eval_batch_size", "tag")


@dataclasses.dataclass(frozen=True)
class Config:
  network: str = "lenet5"
  protocol: str = "seed"
  epochs: int = 10
  batch_size: int = 32
  # Optimisation.
  optimizer: str = "adam"
  learning_rate: float = 1e-3
  schedule: str = "constant"
  warmup_epochs: float = 0.0
  weight_decay: float = 0.0
  momentum: float = 0.0  # sgd momentum (Keras' default is 0); rmsprop momentum.
  nesterov: bool = False
  grad_clip: float = 0.0  # global-norm clipping; 0 disables it.
  label_smoothing: float = 0.0
  loss: str = "cross_entropy"
  # Network options ('' means the network's own default activation).
  activation: str = ""
  bn: str = "batch"  # inception10 only: 'frozen' reproduces the original's quirk.
  dtype: str = "float32"
  matmul_precision: str = "default"
  conv: str = "auto"
  dropout: float = -1.0  # < 0: the network's own rate; only networks with Dropout.
  # Data.
  data: str = ""  # '' -> $CIFAR_FLAX_DATA or tfds.
  augment: bool = False
  normalization: str = "unit"
  train_subset: int = 0  # 0 = the whole training split.
  tta_flip: bool = False
  seed: int = 0
  # Mechanics.
  eval_batch_size: int = 500
  steps_per_call: int = 100  # train steps per device call (one lax.scan).
  checkpoint_every: int = 1  # epochs
  workdir: str = ""  # '' -> ckpt/<network>-<protocol>[-<tag>]
  tag: str = ""
  quiet: bool = False

  def replace(self, **changes) -> "Config":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict) -> "Config":
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})

  def run_dir(self) -> Path:
    if self.workdir:
      return Path(self.workdir)
    name = f"{self.network}-{self.protocol}" + (f"-{self.tag}" if self.tag else "")
    return Path("ckpt") / name

  def model_options(self) -> dict:
    """The keyword options `models.get_model` takes for this run."""
    options = {"dtype": self.dtype, "conv": self.conv}
    if self.activation:
      options["activation"] = self.activation
    if self.network == "inception10":
      options["bn"] = self.bn
    if self.dropout >= 0:
      options["dropout"] = self.dropout
    return options


def canonical_network(name: str) -> str:
  return {"googlenet": "inception10"}.get(name, name)


def seed_protocol(network: str) -> dict:
  """The original project's settings (its README and scripts)."""
  overrides = dict(protocol="seed", epochs=10, batch_size=32, optimizer="adam",
                   learning_rate=1e-3, schedule="constant", augment=False,
                   normalization="unit", tta_flip=False)
  if canonical_network(network) == "inception10":
    overrides["bn"] = "frozen"
  return overrides


# The generic part of every recipe; experiment modules add per-network choices.
RECIPE_BASE = dict(protocol="recipe", epochs=10, batch_size=128, optimizer="sgd",
                   momentum=0.9, nesterov=True, learning_rate=0.1, schedule="onecycle",
                   weight_decay=5e-4, label_smoothing=0.1, augment=True,
                   normalization="standard", tta_flip=True)


def make_config(network: str, protocol: str = "seed", recipe: dict | None = None,
                **overrides) -> Config:
  """Defaults for (network, protocol), then the network's recipe, then overrides."""
  network = canonical_network(network)
  if protocol == "seed":
    values = seed_protocol(network)
  elif protocol == "recipe":
    values = {**RECIPE_BASE, **(recipe or {})}
  else:
    raise ValueError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
  values.update(overrides)
  return Config(network=network, **values)


def _check_choice(field: str, value: str, valid) -> None:
  if value not in valid:
    raise ValueError(f"unknown {field} {value!r}; valid: {', '.join(valid)}")


def validate(config: Config) -> None:
  """Raise ValueError for a configuration that cannot run, before any work."""
  from cifar_flax.models import MODEL_NAMES, network_options  # models import jax; keep config light.
  _check_choice("network", config.network, MODEL_NAMES)
  _check_choice("protocol", config.protocol, PROTOCOLS)
  _check_choice("optimizer", config.optimizer, OPTIMIZERS)
  _check_choice("schedule", config.schedule, SCHEDULES)
  _check_choice("loss", config.loss, LOSSES)
  if config.activation:
    _check_choice("activation", config.activation, ACTIVATION_NAMES)
  _check_choice("bn", config.bn, BN_MODES)
  _check_choice("normalization", config.normalization, NORMALIZATIONS)
  _check_choice("dtype", config.dtype, DTYPES)
  _check_choice("matmul_precision", config.matmul_precision, MATMUL_PRECISIONS)
  _check_choice("conv", config.conv, CONV_IMPLS)
  for name in ("learning_rate", "batch_size", "epochs", "eval_batch_size", "steps_per_call",
               "checkpoint_every"):
    if not getattr(config, name) > 0:
      raise ValueError(f"{name} must be positive, got {getattr(config, name)!r}")
  for name in ("weight_decay", "grad_clip", "warmup_epochs", "momentum", "train_subset"):
    if getattr(config, name) < 0:
      raise ValueError(f"{name} must be non-negative, got {getattr(config, name)!r}")
  if config.dropout >= 0 and "dropout" not in network_options(config.network):
    with_dropout = [n for n in MODEL_NAMES if "dropout" in network_options(n)]
    raise ValueError(f"dropout applies to {', '.join(with_dropout)} only; "
                     f"{config.network} has no Dropout layers")
  if not config.dropout < 1:
    raise ValueError(f"dropout must be below 1, got {config.dropout!r}")
  if not 0 <= config.label_smoothing < 1:
    raise ValueError(f"label_smoothing must be in [0, 1), got {config.label_smoothing!r}")
  if config.warmup_epochs >= config.epochs and config.schedule == "warmup_cosine":
    raise ValueError("warmup_epochs must be shorter than the run")


def check_resumable(saved: Config, wanted: Config) -> None:
  """A run folder may only be resumed by the configuration that made it."""
  a, b = saved.to_dict(), wanted.to_dict()
  safe = set(RESUME_SAFE_FIELDS)
  if saved.schedule == "constant":
    safe.add("epochs")  # extending a constant-rate run does not change its past.
  diffs = [f"{k}: saved {a[k]!r}, now {b[k]!r}" for k in a if k not in safe and a[k] != b[k]]
  if diffs:
    raise ValueError("the run folder holds a different configuration; use --fresh to start "
                     "over or --workdir/--tag for a new run. Differences: " + "; ".join(diffs))


def save_config(config: Config, path: Path) -> None:
  path.write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def load_config(path: Path) -> Config:
  return Config.from_dict(json.loads(Path(path).read_text()))


# --- command line -------------------------------------------------------------

_HELP = {
    "network": "network name", "protocol": "seed (the original's training) or recipe",
    "data": "data source: tfds, an ImageFolder root or a cifar-10-binary archive "
            "(default: $CIFAR_FLAX_DATA or tfds)",
    "workdir": "run folder (default ckpt/<network>-<protocol>[-<tag>])",
    "train_subset": "train on the first N images of a fixed shuffle (0: all)",
    "steps_per_call": "train steps fused into one device call",
    "activation": f"one of {', '.join(ACTIVATION_NAMES)} (default: the network's)",
    "dropout": "Dropout rate of the networks that have Dropout; below 0 keeps the network's own",
}


def add_config_arguments(parser: argparse.ArgumentParser, skip=("network",)) -> None:
  """One option per Config field; unset options keep the protocol's default."""
  hints = typing.get_type_hints(Config)
  for field in dataclasses.fields(Config):
    if field.name in skip:
      continue
    flag = "--" + field.name.replace("_", "-")
    kind = hints[field.name]
    help_text = _HELP.get(field.name, field.name.replace("_", " "))
    if kind is bool:
      parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                          default=None, help=help_text)
    else:
      choices = PROTOCOLS if field.name == "protocol" else None
      parser.add_argument(flag, dest=field.name, type=kind, default=None, choices=choices,
                          help=f"{help_text} (default: {field.default!r} or the protocol's)")


def overrides_from_args(args: argparse.Namespace) -> dict:
  names = {f.name for f in dataclasses.fields(Config)}
  return {k: v for k, v in vars(args).items() if k in names and v is not None}
