"""Training throughput of the peers, TF-Keras and PyTorch, on our five networks.

  python tools/peer_bench.py --framework keras --model vgg16 --batch 128 --data ../shared/data/cifar10-jpeg
  python tools/peer_bench.py --framework torch --model lenet5 --batch 32 [--steps S] [--windows W]

prints one JSON line. The measurement `cifar_flax.bench` makes for our networks,
made the way the performance issue measured the peers: real Adam training steps
(lr 1e-3, the seed protocol; forward, backward, update; BatchNorm in training mode,
Dropout on) with softmax cross-entropy on real CIFAR-10 training batches
(``--data``, scaled to [0, 1]; a fixed set of batches prepared as framework tensors
before timing and cycled through). Timing starts after ``--warmup`` steps; each of
``--windows`` windows runs ``--steps`` steps and ends by fetching the loss (a sync);
the median window is reported. ``--steps 0`` (the default) picks about
``--window-seconds`` per window from a short calibration, so windows suit any machine.

keras: TensorFlow / Keras 3 (channels_last, XLA off as Keras leaves it on CPU), the
better of `model.train_on_batch` and a `tf.function` step with a GradientTape; the
record has both rates. tensorflow-cpu is a project requirement.
torch: PyTorch eager, model and inputs in channels_last memory format, intra-op
threads = os.cpu_count(). torch is not a project dependency: install it with
`pip install torch==2.13.0` (on the project's machines this installs the CPU build
from a local file). Both frameworks run their convolutions through oneDNN on x86.

The networks mirror `cifar_flax.models` layer for layer (same shapes, strides,
padding, pooling, BatchNorm and Dropout placement, activations) and have the same
trainable parameter count; both frameworks build them from one spec per network.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

from cifar_flax.models import DEFAULT_ACTIVATION, MODEL_NAMES, canonical_name
from cifar_flax.models.alexnet import AlexNet8
from cifar_flax.models.layers import BN_EPSILON, BN_MOMENTUM
from cifar_flax.models.vgg import VGG16, VGG16_GROUPS

FRAMEWORKS = ("keras", "torch")
KERAS_MODES = ("train_on_batch", "tf_function")
LEARNING_RATE = 1e-3  # config.seed_protocol
NUM_CLASSES = 10
MAX_BATCHES = 20  # distinct real batches cycled through, as cifar_flax.bench's step mode
CALIBRATION_SECONDS = 0.25

# --------------------------------------------------------------------------------------------
# Networks as data: a list of layer specs, built by both frameworks.
#   ("conv", features, kernel, stride, padding, bias)    padding "same" (TF's rule) | "valid"
#   ("bn",)  ("act",)  ("pool", window, stride, padding)  ("dropout", rate)
#   ("flatten",)  ("gap",)  ("dense", features)
#   ("concat", [branch, ...])   each branch (a spec) on the same input, joined on channels
#   ("add", main, shortcut)     residual sum; an empty shortcut is the identity
# --------------------------------------------------------------------------------------------


def conv_bn_act(features, kernel, stride=1, padding="same", bias=True):
  return [("conv", features, kernel, stride, padding, bias), ("bn",), ("act",)]


def lenet5_spec():
  spec = []
  for features in (6, 16):
    spec += [("conv", features, 5, 1, "valid", True), ("act",), ("pool", 2, 2, "valid")]
  return spec + [("flatten",), ("dense", 120), ("act",), ("dense", 84), ("act",), ("dense", NUM_CLASSES)]


def alexnet8_spec(dropout=AlexNet8.dropout):
  spec = []
  for features in (96, 256):
    spec += conv_bn_act(features, 3, padding="valid") + [("pool", 3, 2, "valid")]
  for features in (384, 384, 256):
    spec += [("conv", features, 3, 1, "same", True), ("act",)]
  spec += [("pool", 3, 2, "valid"), ("flatten",)]
  for _ in range(2):
    spec += [("dense", 2048), ("act",), ("dropout", dropout)]
  return spec + [("dense", NUM_CLASSES)]


def vgg16_spec(dropout=VGG16.dropout):
  spec = []
  for group in VGG16_GROUPS:
    for features in group:
      spec += conv_bn_act(features, 3)
    spec += [("pool", 2, 2, "same"), ("dropout", dropout)]
  spec.append(("flatten",))
  for _ in range(2):
    spec += [("dense", 512), ("act",), ("dropout", dropout)]
  return spec + [("dense", NUM_CLASSES)]


def inception10_spec():
  spec = conv_bn_act(16, 3)
  for features, stride in ((16, 2), (16, 1), (32, 2), (32, 1)):
    reduce = conv_bn_act(features, 1, stride)
    spec.append(("concat", [reduce, reduce + conv_bn_act(features, 3), reduce + conv_bn_act(features, 5),
                            [("pool", 3, 1, "same")] + reduce]))
  return spec + [("gap",), ("dense", NUM_CLASSES)]


def resnet18_spec():
  spec = conv_bn_act(64, 3, bias=False)
  channels = 64
  for stage, features in enumerate((64, 128, 256, 512)):
    for block in range(2):
      stride = 2 if stage > 0 and block == 0 else 1
      main = conv_bn_act(features, 3, stride, bias=False) + [("conv", features, 3, 1, "same", False), ("bn",)]
      shortcut = [("conv", features, 1, stride, "same", False), ("bn",)]
      spec += [("add", main, shortcut if stride != 1 or channels != features else []), ("act",)]
      channels = features
  return spec + [("gap",), ("dense", NUM_CLASSES)]


SPECS = {"lenet5": lenet5_spec, "alexnet8": alexnet8_spec, "vgg16": vgg16_spec,
         "inception10": inception10_spec, "resnet18": resnet18_spec}


def activation_name(model: str) -> str:
  return DEFAULT_ACTIVATION.get(model, "relu")


def same_padding(size: int, kernel: int, stride: int) -> int:
  """Symmetric padding giving TF's 'same' output size ceil(size / stride). TF puts an odd
  total's extra pixel at the end; PyTorch pads both sides alike (shapes and cost agree)."""
  out = math.ceil(size / stride)
  pad = (max((out - 1) * stride + kernel - size, 0) + 1) // 2
  if (size + 2 * pad - kernel) // stride + 1 != out:
    raise ValueError(f"no symmetric padding gives 'same' for size {size}, kernel {kernel}, stride {stride}")
  return pad


# --------------------------------------------------------------------------------------------
# Keras
# --------------------------------------------------------------------------------------------


def keras_model(model: str):
  """The network as a functional Keras model (NHWC) returning logits."""
  os.environ.setdefault("KERAS_BACKEND", "tensorflow")
  import keras
  if keras.backend.backend() != "tensorflow":
    raise ValueError(f"Keras runs on {keras.backend.backend()!r}; set KERAS_BACKEND=tensorflow")
  layers, act = keras.layers, activation_name(model)
  simple = {
      "conv": lambda f, k, s, pad, bias: layers.Conv2D(f, k, s, padding=pad, use_bias=bias),
      "bn": lambda: layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON),
      "act": lambda: layers.Activation(act),
      "pool": lambda w, s, pad: layers.MaxPooling2D(w, s, padding=pad),
      "dropout": lambda rate: layers.Dropout(rate),
      "flatten": layers.Flatten,
      "gap": layers.GlobalAveragePooling2D,
      "dense": lambda f: layers.Dense(f),
  }

  def build(spec, x):
    for op, *args in spec:
      if op == "concat":
        x = layers.Concatenate()([build(branch, x) for branch in args[0]])
      elif op == "add":
        x = layers.Add()([build(args[0], x), build(args[1], x)])
      else:
        x = simple[op](*args)(x)
    return x

  inputs = keras.Input((32, 32, 3))
  return keras.Model(inputs, build(SPECS[model](), inputs), name=model)


def keras_params(net) -> int:
  return int(sum(np.prod(w.shape) for w in net.trainable_weights))


def keras_step(net, mode: str):
  """One training step on (images, labels) -> the loss (a float for train_on_batch, a tensor
  for the tf.function step)."""
  import keras
  import tensorflow as tf
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  optimizer = keras.optimizers.Adam(LEARNING_RATE)
  if mode == "train_on_batch":
    net.compile(optimizer=optimizer, loss=loss_fn)
    return net.train_on_batch
  optimizer.build(net.trainable_variables)  # no variables may be created inside the tf.function

  @tf.function
  def step(images, labels):
    with tf.GradientTape() as tape:
      loss = loss_fn(labels, net(images, training=True))
    optimizer.apply_gradients(zip(tape.gradient(loss, net.trainable_variables), net.trainable_variables))
    return loss
  return step


def bench_keras(model: str, batches_uint8, **timing) -> dict:
  import keras
  import tensorflow as tf
  with tf.device("/CPU:0"):
    batches = [(tf.constant(x.astype(np.float32) / 255.0), tf.constant(y)) for x, y in batches_uint8]
  results = {}
  for mode in KERAS_MODES:
    keras.utils.set_random_seed(0)
    net = keras_model(model)
    step = keras_step(net, mode)
    results[mode] = time_training(step, batches, lambda loss: float(loss), **timing)
  best = max(KERAS_MODES, key=lambda mode: results[mode]["train_img_s"])
  threads = tf.config.threading
  return {**results[best], "params": keras_params(net), "keras_mode": best,
          "keras_rates": {mode: results[mode]["train_img_s"] for mode in KERAS_MODES},
          # 0: TensorFlow's default, one thread per core
          "threads": {"intra_op": threads.get_intra_op_parallelism_threads(),
                      "inter_op": threads.get_inter_op_parallelism_threads()},
          "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") != "0",
          "version": f"tensorflow {tf.__version__}, keras {keras.__version__}"}


# --------------------------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------------------------


def torch_model(model: str):
  """The network as an nn.Module (NCHW logical shape; channels_last memory) returning logits."""
  import torch
  from torch import nn

  class Concat(nn.Module):
    def __init__(self, branches):
      super().__init__()
      self.branches = nn.ModuleList(branches)

    def forward(self, x):
      return torch.cat([branch(x) for branch in self.branches], dim=1)

  class Add(nn.Module):
    def __init__(self, main, shortcut):
      super().__init__()
      self.main, self.shortcut = main, shortcut  # an empty Sequential is the identity

    def forward(self, x):
      return self.main(x) + self.shortcut(x)

  def act():
    return nn.ReLU(inplace=True) if activation_name(model) == "relu" else nn.Sigmoid()

  def build(spec, shape):
    """(nn.Sequential, output shape) of ``spec`` on inputs of ``shape``: (c, h, w) or (features,)."""
    modules = []
    for op, *args in spec:
      if op in ("conv", "pool"):
        window, stride, padding = args[-4:-1] if op == "conv" else args
        pad = same_padding(shape[1], window, stride) if padding == "same" else 0
        size = (shape[1] + 2 * pad - window) // stride + 1
        if op == "conv":
          modules.append(nn.Conv2d(shape[0], args[0], window, stride, pad, bias=args[4]))
          shape = (args[0], size, size)
        else:
          modules.append(nn.MaxPool2d(window, stride, pad))
          shape = (shape[0], size, size)
      elif op == "concat":
        branches = [build(branch, shape) for branch in args[0]]
        modules.append(Concat([branch for branch, _ in branches]))
        shape = (sum(out[0] for _, out in branches), *branches[0][1][1:])
      elif op == "add":
        (main, shape), (shortcut, _) = build(args[0], shape), build(args[1], shape)
        modules.append(Add(main, shortcut))
      elif op == "bn":
        modules.append(nn.BatchNorm2d(shape[0], eps=BN_EPSILON, momentum=1 - BN_MOMENTUM))
      elif op == "act":
        modules.append(act())
      elif op == "dropout":
        modules.append(nn.Dropout(args[0]))
      elif op == "flatten":
        modules.append(nn.Flatten())
        shape = (math.prod(shape),)
      elif op == "gap":
        modules += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        shape = shape[:1]
      elif op == "dense":
        modules.append(nn.Linear(shape[0], args[0]))
        shape = (args[0],)
      else:
        raise ValueError(f"unknown layer spec {op!r}")
    return nn.Sequential(*modules), shape

  return build(SPECS[model](), (3, 32, 32))[0]


def torch_params(net) -> int:
  return int(sum(p.numel() for p in net.parameters() if p.requires_grad))


def bench_torch(model: str, batches_uint8, **timing) -> dict:
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  channels_last = torch.channels_last
  # NHWC uint8 permuted to NCHW is already channels_last in memory.
  batches = [(torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255).contiguous(memory_format=channels_last),
              torch.from_numpy(y.astype(np.int64))) for x, y in batches_uint8]
  net = torch_model(model).to(memory_format=channels_last).train()
  optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
  loss_fn = torch.nn.CrossEntropyLoss()

  def step(images, labels):
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(net(images), labels)
    loss.backward()
    optimizer.step()
    return loss

  result = time_training(step, batches, lambda loss: loss.item(), **timing)
  return {**result, "params": torch_params(net),
          "threads": {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads()},
          "onednn": torch.backends.mkldnn.is_available(), "version": f"torch {torch.__version__}"}


# --------------------------------------------------------------------------------------------
# Data and timing
# --------------------------------------------------------------------------------------------


def make_batches(images: np.ndarray, labels: np.ndarray, batch: int, count: int = MAX_BATCHES):
  """Up to ``count`` distinct batches (uint8 NHWC images, int32 labels) in a fixed shuffle."""
  if len(images) < batch:
    raise ValueError(f"the training split ({len(images)} images) is smaller than one batch of {batch}")
  count = min(count, len(images) // batch)
  order = np.random.default_rng(0).permutation(len(images))[:count * batch].reshape(count, batch)
  return [(np.ascontiguousarray(images[idx]), labels[idx].astype(np.int32)) for idx in order]


def time_training(step, batches, sync, *, steps: int = 0, windows: int = 5, warmup: int = 3,
                  window_seconds: float = 2.0) -> dict:
  """Median images/s of ``windows`` windows of ``steps`` calls of step(images, labels), each
  window ending with sync(last loss); steps 0: about ``window_seconds`` per window."""
  from cifar_flax.bench import _median_rate
  batch = len(batches[0][1])
  cursor = [0]

  def run(n):
    for _ in range(n):
      loss = step(*batches[cursor[0] % len(batches)])
      cursor[0] += 1
    sync(loss)

  run(max(warmup, 1))
  if not steps:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < CALIBRATION_SECONDS:
      run(1)
      done += 1
    steps = max(1, round(window_seconds * done / (time.perf_counter() - start)))
  rate, cores = _median_rate(lambda: run(steps), steps * batch, windows)
  return {"train_img_s": round(rate, 1), "steps": steps, "train_cores_busy": round(cores, 2)}


def run_peer_bench(framework: str, model: str, batch: int, images: np.ndarray, labels: np.ndarray, *,
                   steps: int = 0, windows: int = 5, warmup: int = 3, window_seconds: float = 2.0) -> dict:
  """Measure one framework on one network, training on ``images`` (uint8 NHWC) and ``labels``."""
  if framework not in FRAMEWORKS:
    raise ValueError(f"unknown framework {framework!r}; valid: {list(FRAMEWORKS)}")
  model = canonical_name(model)
  bench = bench_keras if framework == "keras" else bench_torch
  result = bench(model, make_batches(images, labels, batch), steps=steps, windows=windows, warmup=warmup,
                 window_seconds=window_seconds)
  first = ("train_img_s", "params", "steps")
  return {"framework": framework, "model": model, "batch": batch, **{key: result.pop(key) for key in first},
          "windows": windows, **result, "cpu_count": os.cpu_count(),
          # other processes on the machine skew CPU timings; this says how busy it was.
          "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--framework", required=True, choices=FRAMEWORKS)
  p.add_argument("--model", required=True, help=f"one of {', '.join(MODEL_NAMES)} (or googlenet)")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=0, help="train steps per timed window "
                 "(0: about --window-seconds per window)")
  p.add_argument("--window-seconds", type=float, default=2.0)
  p.add_argument("--windows", type=int, default=5, help="timed windows (the median is reported)")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps first (tracing included)")
  p.add_argument("--data", default=None, help="data spec for cifar_flax.data.load_cifar10 "
                 "(default: $CIFAR_FLAX_DATA or tfds)")
  args = p.parse_args(argv)
  if args.steps < 0 or args.batch < 1 or args.windows < 1:
    p.error("--batch and --windows must be positive, --steps non-negative")
  from cifar_flax.data import load_cifar10
  try:
    dataset = load_cifar10(args.data)
    record = run_peer_bench(args.framework, args.model, args.batch, dataset.train_images,
                            dataset.train_labels, steps=args.steps, windows=args.windows,
                            warmup=args.warmup, window_seconds=args.window_seconds)
  except (ValueError, FileNotFoundError) as error:
    sys.exit(f"error: {error}")
  print(json.dumps(record), flush=True)


if __name__ == "__main__":
  main()
