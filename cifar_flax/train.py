"""Training: the state pytree, pure jitted steps, evaluation and `fit`.

The hot loop is `train_chunk`: a `lax.scan` over `steps_per_call` batches whose
indices live on the device, so a small network is not bound by Python dispatch
and nothing syncs with the host inside an epoch except to feed the progress bar
(one chunk behind). Every random choice comes from (seed, step) or
(seed, epoch), never from process state, so a resumed run is bitwise the same
as an uninterrupted one on the CPU.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from cifar_flax import checkpoint, data as data_lib, plots, xla_options
from cifar_flax.config import Config, check_resumable, load_config, save_config, validate
from cifar_flax.models import get_model

NUM_CLASSES = 10


class TrainState(struct.PyTreeNode):
  """Everything that changes during training, as one pytree (orbax saves it)."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  key: jax.Array  # raw PRNG key; dropout and augmentation fold in the step.
  seed: jax.Array  # int32; the data order derives from (seed, epoch).


class Diverged(RuntimeError):
  pass


# --- optimisation ----------------------------------------------------------------


def make_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
  """Learning-rate multiplier with peak 1; the peak rate is an optimizer
  hyperparameter, so sweeps can vmap over it."""
  total = max(1, config.epochs * steps_per_epoch)
  warmup = int(config.warmup_epochs * steps_per_epoch)
  if config.schedule == "constant":
    return optax.constant_schedule(1.0)
  if config.schedule == "cosine":
    return optax.cosine_decay_schedule(1.0, total)
  if config.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, 1.0, max(1, warmup), total)
  if config.schedule == "onecycle":
    pct_start = warmup / total if warmup else 0.25
    return optax.cosine_onecycle_schedule(total, 1.0, pct_start=pct_start)
  raise ValueError(f"unknown schedule {config.schedule!r}")


def _decay_mask(params):
  # Decay kernels only: biases and BatchNorm scales are not regularised.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _base_optimizer(name: str, nesterov: bool) -> Callable[..., optax.GradientTransformation]:
  # Epsilons and accumulators follow Keras, whose defaults the original used.
  def build(learning_rate, weight_decay, momentum):
    l2 = optax.add_decayed_weights(weight_decay, mask=_decay_mask)
    if name == "sgd":
      return optax.chain(l2, optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))
    if name == "rmsprop":
      return optax.chain(l2, optax.rmsprop(learning_rate, decay=0.9, eps=1e-7, momentum=momentum))
    if name == "adagrad":
      return optax.chain(l2, optax.adagrad(learning_rate, initial_accumulator_value=0.1, eps=1e-7))
    if name == "adadelta":
      return optax.chain(l2, optax.adadelta(learning_rate, rho=0.95, eps=1e-7))
    if name == "adam":
      return optax.chain(l2, optax.adam(learning_rate, eps=1e-7))
    if name == "adamw":
      return optax.adamw(learning_rate, eps=1e-7, weight_decay=weight_decay, mask=_decay_mask)
    raise ValueError(f"unknown optimizer {name!r}")
  return build


def make_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
  """The numeric hyperparameters live in the optimizer state
  (`inject_hyperparams`), so members of a sweep share one program."""
  parts = []
  if config.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip))
  parts.append(optax.inject_hyperparams(_base_optimizer(config.optimizer, config.nesterov))(
      learning_rate=config.learning_rate, weight_decay=config.weight_decay,
      momentum=config.momentum))
  parts.append(optax.scale_by_schedule(make_schedule(config, steps_per_epoch)))
  return optax.chain(*parts)


def compute_loss(logits, labels, loss: str, label_smoothing: float = 0.0):
  """Per-example loss. MSE and BCE compare softmax probabilities with one-hot
  targets, as the original's loss study did with Keras."""
  targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  if loss == "cross_entropy":
    return optax.softmax_cross_entropy(logits, targets)
  probs = jax.nn.softmax(logits)
  if loss == "mse":
    return jnp.mean((probs - targets) ** 2, axis=-1)
  if loss == "bce":
    probs = jnp.clip(probs, 1e-7, 1 - 1e-7)
    return -jnp.mean(targets * jnp.log(probs) + (1 - targets) * jnp.log1p(-probs), axis=-1)
  raise ValueError(f"unknown loss {loss!r}")


# --- state and steps ---------------------------------------------------------------


def create_train_state(config: Config, model, tx: optax.GradientTransformation,
                       seed: int | None = None) -> TrainState:
  seed = config.seed if seed is None else seed
  root = jax.random.PRNGKey(seed)
  init_key, train_key = jax.random.split(root)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3), jnp.float32),
                                           train=False))(init_key)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                    key=train_key, seed=jnp.asarray(seed, jnp.int32))


def model_variables(state: TrainState) -> dict:
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return variables


def under_matmul_precision(fn: Callable, precision: str) -> Callable:
  """``fn``, traced under ``jax.default_matmul_precision(precision)`` ('default': unchanged)."""
  if precision == "default":
    return fn

  @functools.wraps(fn)
  def traced_under(*args, **kwargs):
    with jax.default_matmul_precision(precision):
      return fn(*args, **kwargs)
  return traced_under


def make_train_step(model, tx, config: Config):
  """train_step(state, (images, labels)) -> (state, metrics); pure."""
  @functools.partial(under_matmul_precision, precision=config.matmul_precision)
  def train_step(state: TrainState, batch):
    images, labels = batch
    dropout_key = jax.random.fold_in(jax.random.fold_in(state.key, state.step), 0)

    def loss_fn(params):
      variables = model_variables(state.replace(params=params))
      logits, updates = model.apply(variables, images, train=True, rngs={"dropout": dropout_key},
                                    mutable=["batch_stats"])
      loss = compute_loss(logits, labels, config.loss, config.label_smoothing).mean()
      return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, param_updates),
                              batch_stats=updates.get("batch_stats", state.batch_stats),
                              opt_state=opt_state)
    correct = jnp.sum(jnp.argmax(logits, -1) == labels)
    return new_state, {"loss": loss, "correct": correct}
  return train_step


def make_train_chunk(model, tx, config: Config, mesh: Mesh | None = None):
  """train_chunk(state, images, labels, indices[S, B]) -> (state, sums): S steps
  in one `lax.scan`. Images stay uint8 on the device; batches are gathered,
  augmented and normalised inside the program."""
  train_step = make_train_step(model, tx, config)
  compute_dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32

  def train_chunk(state, images, labels, indices):
    def body(state, batch_indices):
      aug_key = jax.random.fold_in(jax.random.fold_in(state.key, state.step), 1)
      x, y = data_lib.make_batch(images, labels, batch_indices, aug_key, augment=config.augment,
                                 normalization=config.normalization, dtype=compute_dtype)
      if mesh is not None:  # data parallel: split the batch over the 'data' axis.
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("data")))
        y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P("data")))
      return train_step(state, (x, y))

    state, metrics = jax.lax.scan(body, state, indices)
    batch = indices.shape[-1]
    return state, {"loss_sum": jnp.sum(metrics["loss"]) * batch,
                   "correct": jnp.sum(metrics["correct"]),
                   "nonfinite": jnp.any(~jnp.isfinite(metrics["loss"]))}
  return train_chunk


def make_epoch_indices(num_examples: int, batch_size: int):
  """(seed, epoch) -> int32[steps, batch]; the remainder of the shuffle is dropped."""
  steps = num_examples // batch_size

  def epoch_indices(seed, epoch):
    order = data_lib.epoch_permutation(seed, epoch, num_examples)
    return order[: steps * batch_size].reshape(steps, batch_size)
  return epoch_indices


def make_evaluate(model, config: Config):
  """evaluate(variables, images, labels) -> (loss_sum, correct) over a padded
  test set: labels < 0 mark padding and are masked out, so every image counts
  exactly once. Flip test-time augmentation averages the two views' probabilities."""
  compute_dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
  batch_size = config.eval_batch_size

  @functools.partial(under_matmul_precision, precision=config.matmul_precision)
  def evaluate(variables, images, labels):
    batches = (images.reshape(-1, batch_size, *images.shape[1:]), labels.reshape(-1, batch_size))

    def body(totals, batch):
      x_uint8, y = batch
      x = data_lib.normalize(x_uint8, config.normalization, compute_dtype)
      logits = model.apply(variables, x, train=False)
      if config.tta_flip:
        flipped = model.apply(variables, x[:, :, ::-1], train=False)
        logits = jnp.log((jax.nn.softmax(logits) + jax.nn.softmax(flipped)) / 2)
      mask = y >= 0
      safe_y = jnp.where(mask, y, 0)
      loss = jnp.where(mask, compute_loss(logits, safe_y, config.loss), 0.0)
      correct = jnp.where(mask, jnp.argmax(logits, -1) == safe_y, False)
      return (totals[0] + loss.sum(), totals[1] + correct.sum()), None

    zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    totals, _ = jax.lax.scan(body, zero, batches)
    return totals
  return evaluate


def pad_to_multiple(images: np.ndarray, labels: np.ndarray, multiple: int):
  """Pads with blank images labelled -1 (masked out by `evaluate`)."""
  pad = (-len(images)) % multiple
  if pad:
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.full((pad,), -1, labels.dtype)])
  return images, labels


def make_mesh(batch_size: int) -> Mesh | None:
  """A 1-D 'data' mesh over all devices (every process's), or None for one device."""
  devices = jax.devices()
  if len(devices) == 1:
    return None
  if batch_size % len(devices):
    raise ValueError(f"batch size {batch_size} is not divisible by the {len(devices)} devices")
  return Mesh(np.array(devices), ("data",))


def describe_cpu(cpuinfo: str | None = None) -> str:
  """Architecture, model name and widest vector unit: machines of one kind differ (2-core
  x86_64 machines here measured 180 and 380 GFLOP/s on the same float32 matmul)."""
  if cpuinfo is None:
    try:
      cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
      cpuinfo = ""
  fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
  fields = {key.strip(): value.strip() for key, value in fields.items()}
  flags = set(fields.get("flags", "").split())
  vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
  return ", ".join(part for part in (platform.machine(), fields.get("model name", ""), vector) if part)


def describe_machine() -> str:
  """What the run's numbers were measured on, for the results tables."""
  device = jax.devices()[0]
  kind = f"{jax.device_count()}x {device.device_kind}" if device.platform != "cpu" else "CPU only"
  return f"{kind}, {os.cpu_count()} CPU cores ({describe_cpu()})"


def maybe_initialize_distributed() -> None:
  """Multi-host: join the cluster when a standard launcher set the environment."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()


# --- the loop -----------------------------------------------------------------------


def select_subset(images, labels, size: int):
  """The first `size` images of a fixed shuffle (independent of the run's seed)."""
  if not size or size >= len(images):
    return images, labels
  order = np.random.default_rng(0).permutation(len(images))[:size]
  return images[order], labels[order]


class Trainer:
  """Builds the compiled functions of one configuration over one dataset.
  `fit` drives it; the sweep runner reuses its pieces under `jax.vmap`."""

  def __init__(self, config: Config, dataset: data_lib.Cifar10, mesh: Mesh | None = None):
    validate(config)
    self.config = config
    train_images, train_labels = select_subset(dataset.train_images, dataset.train_labels,
                                               config.train_subset)
    if config.batch_size > len(train_images):
      raise ValueError(f"batch size {config.batch_size} is larger than the training set "
                       f"({len(train_images)} images)")
    self.num_train = len(train_images)
    self.steps_per_epoch = self.num_train // config.batch_size
    self.model = get_model(config.network, **config.model_options())
    self.tx = make_optimizer(config, self.steps_per_epoch)
    self.mesh = mesh
    replicated = NamedSharding(mesh, P()) if mesh is not None else None
    put = lambda x: jax.device_put(x, replicated)
    self.train_images, self.train_labels = put(train_images), put(train_labels)
    test_images, test_labels = pad_to_multiple(dataset.test_images, dataset.test_labels,
                                               config.eval_batch_size)
    self.test_images, self.test_labels = put(test_images), put(test_labels)
    self.num_test = len(dataset.test_images)
    self.train_chunk = xla_options.jit(make_train_chunk(self.model, self.tx, config, mesh),
                                       donate_argnums=(0,))
    self.evaluate = xla_options.jit(make_evaluate(self.model, config))
    self.epoch_indices = jax.jit(make_epoch_indices(self.num_train, config.batch_size))

  def init_state(self, seed: int | None = None) -> TrainState:
    state = create_train_state(self.config, self.model, self.tx, seed)
    if self.mesh is not None:
      state = jax.device_put(state, NamedSharding(self.mesh, P()))
    return state

  def chunks(self, indices):
    """Slices of an epoch's indices ([steps, batch], or [members, steps, batch]),
    `steps_per_call` steps each."""
    return split_steps(indices, self.config.steps_per_call)


def split_steps(indices, steps_per_call: int):
  """Slices of `steps_per_call` steps of int32[..., steps, batch] epoch indices
  (a leading member axis, if any, is kept whole)."""
  steps = indices.shape[-2]
  return [indices[..., i:i + steps_per_call, :] for i in range(0, steps, steps_per_call)]


def run_chunks(run_chunk, state, chunks, collect):
  """state after `run_chunk(state, chunk)` over `chunks`. Each chunk's sums go
  to `collect(sums, steps)` one chunk late, so the device never waits for the host."""
  pending = None
  for chunk in chunks:
    state, chunk_sums = run_chunk(state, chunk)
    if pending is not None:
      collect(*pending)
    pending = (chunk_sums, chunk.shape[-2])
  if pending is not None:
    collect(*pending)
  return state


def add_chunk_sums(sums: dict, chunk_sums, images: int) -> None:
  """Adds a chunk's (scalar or per-member) sums, fetched to the host, into `sums`."""
  chunk_sums = jax.device_get(chunk_sums)
  sums["loss_sum"] = sums["loss_sum"] + np.asarray(chunk_sums["loss_sum"], np.float64)
  sums["correct"] = sums["correct"] + np.asarray(chunk_sums["correct"], np.int64)
  sums["nonfinite"] = sums["nonfinite"] | np.asarray(chunk_sums["nonfinite"])
  sums["count"] += images


def _epoch_record(epoch, sums, test_loss_sum, test_correct, num_test, train_seconds,
                  test_seconds, num_images):
  """One epoch's history entry; `seconds` is its training plus its test evaluation."""
  return dict(epoch=epoch, train_loss=sums["loss_sum"] / sums["count"],
              train_accuracy=sums["correct"] / sums["count"],
              test_loss=float(test_loss_sum) / num_test, test_accuracy=int(test_correct) / num_test,
              seconds=train_seconds + test_seconds, test_seconds=test_seconds,
              train_images_per_second=num_images / max(train_seconds, 1e-9))


def evaluate_test_set(trainer: Trainer, state: TrainState) -> tuple[float, int, float]:
  """(test loss sum, correct count, seconds) as host numbers.

  Fetching the results inside the timed span matters: the jitted evaluation
  is dispatched asynchronously, so a clock read right after the call would
  miss the evaluation itself.
  """
  start = time.perf_counter()
  loss_sum, correct = jax.device_get(trainer.evaluate(model_variables(state), trainer.test_images,
                                                      trainer.test_labels))
  return float(loss_sum), int(correct), time.perf_counter() - start


def train_one_epoch(trainer: Trainer, state: TrainState, epoch: int, progress):
  """One epoch's chunks -> (state, sums, seconds); the sums are Python numbers."""
  indices = trainer.epoch_indices(state.seed, epoch)
  sums = {"loss_sum": 0.0, "correct": 0, "count": 0, "nonfinite": False}
  start = time.perf_counter()

  def collect(chunk_sums, steps):
    add_chunk_sums(sums, chunk_sums, steps * trainer.config.batch_size)
    progress.update(steps)
    seen = sums["count"]
    progress.set_postfix(loss=f"{sums['loss_sum'] / seen:.4f}", acc=f"{sums['correct'] / seen:.4f}",
                         img_s=f"{seen / (time.perf_counter() - start):.0f}")

  run_chunk = lambda s, chunk: trainer.train_chunk(s, trainer.train_images, trainer.train_labels,
                                                   chunk)
  state = run_chunks(run_chunk, state, trainer.chunks(indices), collect)
  sums.update(loss_sum=float(sums["loss_sum"]), correct=int(sums["correct"]),
              nonfinite=bool(sums["nonfinite"]))
  return state, sums, time.perf_counter() - start


def fit(config: Config, *, fresh: bool = False, dataset: data_lib.Cifar10 | None = None,
        stop_after_epoch: int | None = None) -> dict:
  """Trains `config`, resuming its run folder if it holds a checkpoint.

  Returns the history: {'config', 'status', 'epochs': [per-epoch records]}.
  `stop_after_epoch` ends this call early (as an interruption would); the
  next call resumes.
  """
  validate(config)
  run_dir = config.run_dir()
  if fresh and run_dir.exists():
    shutil.rmtree(run_dir)
  config_path = run_dir / "config.json"
  if config_path.exists():
    check_resumable(load_config(config_path), config)
  dataset = dataset if dataset is not None else data_lib.load_cifar10(config.data or None)
  trainer = Trainer(config, dataset, make_mesh(config.batch_size))
  run_dir.mkdir(parents=True, exist_ok=True)
  save_config(config, config_path)
  # Quiet mode drops the progress bar; the one-line summaries stay (for logs).
  log = lambda message: print(message, flush=True)
  log("config: " + json.dumps(config.to_dict()))

  state = trainer.init_state()
  history = {"network": config.network, "protocol": config.protocol, "status": "running",
             "machine": describe_machine(), "epochs": []}
  manager = checkpoint.make_manager(run_dir)
  restored = checkpoint.restore_latest(manager, checkpoint.abstract_like(state))
  if restored is not None:
    state, history = restored
    if trainer.mesh is not None:
      state = jax.device_put(state, NamedSharding(trainer.mesh, P()))
    log(f"resumed {run_dir} after epoch {len(history['epochs'])}")

  first_epoch = len(history["epochs"]) + 1
  for epoch in range(first_epoch, config.epochs + 1):
    if stop_after_epoch is not None and epoch > stop_after_epoch:
      break
    with tqdm(total=trainer.steps_per_epoch, desc=f"{config.network} epoch {epoch}/{config.epochs}",
              unit="step", disable=config.quiet, leave=False, file=sys.stdout) as progress:
      state, sums, train_seconds = train_one_epoch(trainer, state, epoch, progress)
    test_loss_sum, test_correct, test_seconds = evaluate_test_set(trainer, state)
    record = _epoch_record(epoch, sums, test_loss_sum, test_correct, trainer.num_test,
                           train_seconds, test_seconds, trainer.steps_per_epoch * config.batch_size)
    if sums["nonfinite"] or not math.isfinite(record["test_loss"]):
      history["status"] = "diverged"
      history["epochs"].append({**record, "diverged": True})
      _write_outputs(run_dir, history)
      print(f"{config.network}: training diverged in epoch {epoch} (non-finite loss); "
            f"stopped. Try a lower learning rate.", file=sys.stderr)
      return history
    history["epochs"].append(record)
    log(f"epoch {epoch:3d}/{config.epochs}  train loss {record['train_loss']:.4f} "
        f"acc {record['train_accuracy']:.4f}  test loss {record['test_loss']:.4f} "
        f"acc {record['test_accuracy']:.4f}  {record['seconds']:.1f}s "
        f"{record['train_images_per_second']:.0f} img/s")
    if epoch == config.epochs:
      history["status"] = "finished"
    if epoch % config.checkpoint_every == 0 or epoch == config.epochs:
      checkpoint.save_checkpoint(manager, epoch, state, history,
                                 {"test_accuracy": record["test_accuracy"]})
      checkpoint.save_inference(run_dir, network=config.network,
                                model_options=config.model_options(),
                                variables=jax.device_get(model_variables(state)),
                                normalization=config.normalization, epoch=epoch,
                                test_accuracy=record["test_accuracy"])
    _write_outputs(run_dir, history)
  manager.close()
  return history


def _write_outputs(run_dir: Path, history: dict) -> None:
  tmp = run_dir / "history.json.tmp"
  tmp.write_text(json.dumps(history, indent=1) + "\n")
  os.replace(tmp, run_dir / "history.json")
  if history["epochs"]:
    plots.plot_curves(history, run_dir / "curves.png")
