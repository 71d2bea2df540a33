"""Hyperparameter sweeps: many runs of one network, sharing compiled programs.

A sweep is a list of members, each a full `Config`. Members are planned into
runs and groups before any work:

* a *run* is one training: members whose configurations differ only in the
  number of epochs of a constant learning rate are one run (the shorter ones
  are the longer run's history cut at their epoch: same seed, same data order,
  and nothing in the maths depends on the total length);
* a *group* is the runs that differ only in numbers that live in arrays
  (`VMAPPED_FIELDS`: the optimizer's injected hyperparameters and the seed).
  A group shares one compiled program: `jax.vmap` over stacked train states,
  sharded over a 'members' mesh axis when there are several devices ('vmap',
  the default on accelerators), or the trainer's own program called for one
  member after another ('loop', the default on the CPU, where a vmapped step
  measured slower per member: see experiments/sweep_speed.py). Runs that
  change shapes or static choices (batch size, optimizer, loss, activation,
  network, ...) fall in different groups, which are trained one after another.

Each group checkpoints its stacked state with orbax every epoch in
`<workdir>/groups/<group id>/`, so an interrupted sweep resumes where it
stopped and a finished group is skipped; group ids hash the runs' maths, so a
changed grid never resumes the wrong state. Finished runs are also looked up by
their maths in earlier sweeps' folders (`reuse_dirs`): the base configuration
that appears in every study is trained once, and a longer constant-rate run
continues a shorter one's group from its checkpoint. A member whose loss becomes
non-finite is a result ("diverged"): its curve stops and the others go on
(a vmapped slot keeps computing, ignored; a looped member is skipped).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import time
import typing
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from cifar_flax import checkpoint, plots, train, xla_options
from cifar_flax import data as data_lib
from cifar_flax.config import (RESUME_SAFE_FIELDS, Config, canonical_network, make_config,
                               validate)
from cifar_flax.models import DEFAULT_ACTIVATION

# Numbers that live in arrays of the train state, so runs differing only in
# them share one program. (label_smoothing is a Python branch of the loss, so
# it stays static.)
VMAPPED_FIELDS = ("learning_rate", "weight_decay", "momentum", "seed")
# Fields that never change the maths (where data lives, output, save cadence).
MECHANICS_FIELDS = RESUME_SAFE_FIELDS

FIELD_ALIASES = {
    "lr": "learning_rate", "wd": "weight_decay", "bs": "batch_size", "batch": "batch_size",
    "opt": "optimizer", "act": "activation", "ls": "label_smoothing", "mom": "momentum",
    "model": "network", "net": "network", "subset": "train_subset", "clip": "grad_clip",
}

# The original project's six GoogLeNet studies, each changing one thing of the
# seed protocol (Adam 1e-3, cross-entropy, ReLU, batch 32, 10 epochs).
STUDY_NETWORK = "inception10"
STUDIES: dict[str, tuple] = {
    "learning_rate": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    "optimizer": ("sgd", "rmsprop", "adagrad", "adadelta", "adam"),
    "loss": ("mse", "bce", "cross_entropy"),
    "activation": ("sigmoid", "tanh", "relu"),
    "batch_size": (16, 32, 64, 128, 256),
    "epochs": (5, 10, 20, 50),
}
FIELD_TITLES = {"learning_rate": "learning rate", "batch_size": "batch size",
                "weight_decay": "weight decay", "label_smoothing": "label smoothing"}

GROUPS_DIR = "groups"
HISTORIES_FILE = "histories.json"


# --- members, grids and studies ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Member:
  """One point of a sweep: the gridded (field, value) pairs and its full config."""
  values: tuple[tuple[str, Any], ...]
  config: Config

  @property
  def label(self) -> str:
    if len(self.values) == 1:
      return format_value(self.values[0][1])
    return ", ".join(f"{field}={format_value(value)}" for field, value in self.values)


@dataclasses.dataclass(frozen=True)
class Study:
  name: str
  fields: tuple[str, ...]  # the gridded fields, in order
  members: tuple[Member, ...]
  workdir: Path
  command: str = ""
  # Other sweeps' folders whose finished runs may stand in for members here.
  reuse_dirs: tuple[Path, ...] = ()


def format_value(value) -> str:
  if isinstance(value, float):
    return f"{value:g}"
  return str(value)


def resolve_field(name: str) -> str:
  """A Config field name from a name or alias ('lr' -> 'learning_rate')."""
  fields = {f.name for f in dataclasses.fields(Config)}
  field = FIELD_ALIASES.get(name, name).replace("-", "_")
  if field not in fields or field in MECHANICS_FIELDS or field == "protocol":
    valid = sorted(fields - set(MECHANICS_FIELDS) - {"protocol"}) + sorted(FIELD_ALIASES)
    raise ValueError(f"cannot grid over {name!r}; valid fields and aliases: {', '.join(valid)}")
  return field


def parse_value(field: str, text: str):
  """A grid value typed like its Config field ('1e-3' -> 0.001 for learning_rate)."""
  kind = typing.get_type_hints(Config)[field]
  text = text.strip()
  try:
    if kind is bool:
      lowered = text.lower()
      if lowered not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(text)
      return lowered in ("true", "1", "yes")
    if kind is int:
      number = float(text)
      if number != int(number):
        raise ValueError(text)
      return int(number)
    return kind(text)
  except ValueError:
    raise ValueError(f"bad value {text!r} for {field} (expects {kind.__name__})") from None


def parse_grid(specs: list[str]) -> dict[str, list]:
  """['lr=1e-3,3e-3', 'seed=0,1'] -> {'learning_rate': [0.001, 0.003], 'seed': [0, 1]}."""
  grid: dict[str, list] = {}
  for spec in specs:
    name, sep, values = spec.partition("=")
    if not sep or not values.strip():
      raise ValueError(f"bad grid {spec!r}; expected FIELD=V1,V2,... (e.g. lr=1e-3,3e-3)")
    field = resolve_field(name.strip())
    if field in grid:
      raise ValueError(f"{field} is gridded twice")
    parsed = [parse_value(field, v) for v in values.split(",") if v.strip()]
    if len(set(parsed)) != len(parsed):
      raise ValueError(f"repeated value in grid {spec!r}")
    grid[field] = parsed
  if not grid:
    raise ValueError("empty grid; give at least one --grid FIELD=V1,V2,...")
  return grid


def grid_members(base: Config, grid: dict[str, list]) -> tuple[Member, ...]:
  """The product of the grids applied to `base`; every member is validated."""
  members = []
  for combo in itertools.product(*grid.values()):
    values = tuple(zip(grid, combo))
    changes = dict(values)
    if "network" in changes:
      changes["network"] = canonical_network(changes["network"])
    config = base.replace(**changes)
    validate(config)
    members.append(Member(values, config))
  return tuple(members)


def study_values(name: str, max_epochs: int | None = None) -> tuple:
  """The values of a predefined study. For the epochs study, `max_epochs`
  caps the grid (a reduced budget): values above it become it."""
  if name not in STUDIES:
    raise ValueError(f"unknown study {name!r}; valid: {', '.join(STUDIES)}, all")
  values = STUDIES[name]
  if name == "epochs" and max_epochs:
    values = tuple(sorted({min(v, max_epochs) for v in values}))
  return values


def make_study(name: str, workdir: Path | None = None, command: str = "",
               protocol: str = "seed", recipe: dict | None = None, **overrides) -> Study:
  """One of the original's GoogLeNet studies (on the seed protocol unless told
  otherwise), with Config overrides (e.g. epochs, train_subset, data). Its
  default folder is ckpt/sweeps/<name>; the sibling studies' folders are
  searched for reusable runs (the base configuration is in every study)."""
  max_epochs = overrides.get("epochs") if name == "epochs" else None
  values = study_values(name, max_epochs)
  base = make_config(STUDY_NETWORK, protocol, recipe, **overrides)
  workdir = Path(workdir) if workdir else Path("ckpt/sweeps") / name
  reuse = tuple(workdir.parent / other for other in STUDIES if other != name)
  return Study(name=name, fields=(name,), members=grid_members(base, {name: list(values)}),
               workdir=workdir, command=command, reuse_dirs=reuse)


# --- planning: members -> runs -> groups ---------------------------------------------


def _maths(config: Config) -> dict:
  """What determines a run's numbers. With a constant learning rate the
  number of epochs only says where to stop, so it is not part of it."""
  values = {k: v for k, v in config.to_dict().items() if k not in MECHANICS_FIELDS}
  # Spell defaults out, so 'relu' and '' (inception10's default) are one run.
  values["activation"] = config.activation or DEFAULT_ACTIVATION.get(config.network, "relu")
  if config.network != "inception10":
    values.pop("bn")  # only inception10 reads it
  if config.schedule == "constant":
    values.pop("epochs")
    values.pop("warmup_epochs")
  return values


def _digest(value) -> str:
  return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def run_id(config: Config) -> str:
  return _digest(_maths(config))


@dataclasses.dataclass(frozen=True)
class Run:
  id: str
  config: Config  # epochs = the longest member's


@dataclasses.dataclass(frozen=True)
class Group:
  id: str
  runs: tuple[Run, ...]

  @property
  def epochs(self) -> int:
    return self.runs[0].config.epochs


def plan_runs(members) -> dict[str, Run]:
  """Members -> unique runs, each as long as its longest member."""
  runs: dict[str, Run] = {}
  for member in members:
    rid = run_id(member.config)
    if rid not in runs or member.config.epochs > runs[rid].config.epochs:
      runs[rid] = Run(rid, member.config)
  return runs


def _static_key(config: Config) -> str:
  values = {k: v for k, v in _maths(config).items() if k not in VMAPPED_FIELDS}
  values["epochs"] = config.epochs  # a group trains all its runs for as long
  return json.dumps(values, sort_keys=True)


def make_group(runs) -> Group:
  runs = tuple(runs)
  # The id hashes the runs (not their epochs), so extending a constant-rate
  # sweep resumes its groups.
  return Group(id="g" + _digest(sorted(run.id for run in runs)), runs=runs)


def plan_groups(runs) -> list[Group]:
  """Runs equal in every static field form one vmapped group (in first-seen order)."""
  buckets: dict[str, list[Run]] = {}
  for run in runs:
    buckets.setdefault(_static_key(run.config), []).append(run)
  return [make_group(bucket) for bucket in buckets.values()]


# --- histories on disk ----------------------------------------------------------------


def new_history(config: Config) -> dict:
  """A run's history, shaped like `train.fit`'s, plus the run's config."""
  return {"network": config.network, "protocol": config.protocol, "status": "running",
          "epochs": [], "config": config.to_dict()}


def is_complete(history: dict, epochs: int) -> bool:
  return history["status"] == "diverged" or len(history["epochs"]) >= epochs


def read_group(folder: Path) -> dict | None:
  path = Path(folder) / HISTORIES_FILE
  if not path.is_file():
    return None
  return json.loads(path.read_text())


def write_group(folder: Path, saved: dict) -> None:
  tmp = Path(folder) / (HISTORIES_FILE + ".tmp")
  tmp.write_text(json.dumps(saved, indent=1) + "\n")
  os.replace(tmp, Path(folder) / HISTORIES_FILE)


def index_finished_runs(dirs) -> dict[str, tuple[dict, Path]]:
  """run id -> (history, group folder) for every final history (finished or
  diverged) saved under `<dir>/groups/*/`; the longest one wins."""
  found: dict[str, tuple[dict, Path]] = {}
  for directory in dirs:
    for path in sorted(Path(directory).glob(f"{GROUPS_DIR}/*/{HISTORIES_FILE}")):
      try:
        saved = json.loads(path.read_text())
      except (OSError, ValueError):
        continue  # a folder being written by another process; not reusable now.
      for entry in saved.get("runs", []):
        history = entry["history"]
        if history["status"] not in ("finished", "diverged"):
          continue
        best = found.get(entry["run"])
        if best is None or len(history["epochs"]) > len(best[0]["epochs"]):
          found[entry["run"]] = (history, path.parent)
  return found


def continue_shorter_group(group: Group, dirs, groups_dir: Path, log=print) -> None:
  """Copies another sweep's folder of the same group (same runs, fewer epochs:
  a constant-rate run is extended) into `groups_dir`, so that the group resumes
  from its last checkpoint instead of training its first epochs again."""
  for directory in dirs:
    source = Path(directory) / GROUPS_DIR / group.id
    saved = read_group(source)
    if saved is not None and saved["epoch"] < group.epochs and (source / "checkpoints").is_dir():
      shutil.copytree(source, Path(groups_dir) / group.id)
      log(f"group {group.id}: continuing the {saved['epoch']}-epoch group of {source}")
      return


def member_history(run_history: dict, epochs: int) -> dict:
  """A member's history: its run's, cut at the member's epoch count."""
  records = run_history["epochs"][:epochs]
  diverged = bool(records) and bool(records[-1].get("diverged"))
  if diverged:
    status = "diverged"
  elif len(records) >= epochs:
    status = "finished"
  else:
    status = run_history["status"] if run_history["status"] != "finished" else "running"
  config = dict(run_history.get("config", {}), epochs=epochs)
  return {**run_history, "status": status, "epochs": records, "config": config}


# --- training a group --------------------------------------------------------------


MEMBER_MODES = ("auto", "vmap", "loop")
MEMBER_MODE_WORDS = {"vmap": "vmapped", "loop": "looped"}


def resolve_member_mode(mode: str) -> str:
  """'auto' -> 'vmap' on accelerators; 'loop' on the CPU. Both share one
  compiled program and its evaluation, and both beat separate runs there
  (GoogLeNet, 5 learning rates, 1 epoch of 5,000 images: vmap 1.6x, loop 2.0x
  faster than 5 runs of the trainer; experiments/sweep_speed.py), but on two
  busy cores a vmapped step does the same work as K steps and only adds the
  per-member bookkeeping, so looping the members wins there."""
  if mode not in MEMBER_MODES:
    raise ValueError(f"unknown member mode {mode!r}; valid: {', '.join(MEMBER_MODES)}")
  if mode != "auto":
    return mode
  return "loop" if jax.default_backend() == "cpu" else "vmap"


def member_mesh(count: int):
  """A 'members' mesh over the most devices that divide `count` (None: one device)."""
  devices = jax.devices()
  size = max(d for d in range(1, len(devices) + 1) if count % d == 0)
  if size == 1:
    return None
  return Mesh(np.array(devices[:size]), ("members",))


def stack_trees(trees):
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack_tree(tree, count: int):
  return [jax.tree.map(lambda leaf: leaf[k], tree) for k in range(count)]


def _is_injected(node) -> bool:
  return isinstance(node, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState))


def set_hyperparams(opt_state, values: dict):
  """`opt_state` with the injected hyperparameters (learning rate, weight
  decay, momentum) set to `values`, keeping their dtypes."""
  def replace(node):
    if not _is_injected(node):
      return node
    hyperparams = dict(node.hyperparams)
    for name, value in values.items():
      if name in hyperparams:
        hyperparams[name] = jnp.asarray(value, jnp.asarray(hyperparams[name]).dtype)
    return node._replace(hyperparams=hyperparams)
  return jax.tree.map(replace, opt_state, is_leaf=_is_injected)


INJECTED_FIELDS = ("learning_rate", "weight_decay", "momentum")


class GroupTrainer:
  """The compiled functions of one group, built once for all its members.

  Members differ only in arrays of the train state, so one program serves
  them all, either under `jax.vmap` over a leading member axis ('vmap',
  sharded over a 'members' mesh when there are several devices) or called
  for one member after another ('loop'; the trainer's own jitted chunk).
  Both keep the group's state stacked on a leading member axis.
  """

  def __init__(self, configs: list[Config], dataset, mode: str = "auto"):
    self.configs = configs
    self.size = len(configs)
    self.mode = resolve_member_mode(mode)
    base = configs[0]
    self.trainer = trainer = train.Trainer(base, dataset)
    self.mesh = member_mesh(self.size) if self.mode == "vmap" else None
    self.member_sharding = None
    self.train_images, self.train_labels = trainer.train_images, trainer.train_labels
    self.test_images, self.test_labels = trainer.test_images, trainer.test_labels
    if self.mesh is not None:
      self.member_sharding = NamedSharding(self.mesh, P("members"))
      put = lambda x: jax.device_put(x, NamedSharding(self.mesh, P()))
      self.train_images, self.train_labels = put(self.train_images), put(self.train_labels)
      self.test_images, self.test_labels = put(self.test_images), put(self.test_labels)
    # The optimizer's update reads learning rate, weight decay and momentum
    # from each member's state, so the base's `tx` serves every member.
    chunk = train.make_train_chunk(trainer.model, trainer.tx, base)
    self.train_chunk = xla_options.jit(jax.vmap(chunk, in_axes=(0, None, None, 0)),
                                       donate_argnums=(0,))
    self.evaluate = xla_options.jit(jax.vmap(train.make_evaluate(trainer.model, base),
                                             in_axes=(0, None, None)))
    self.epoch_indices = jax.jit(jax.vmap(
        train.make_epoch_indices(trainer.num_train, base.batch_size), in_axes=(0, None)))

  def init_state(self):
    """Each member's initial state (its seed, its hyperparameters), stacked;
    the same values as `train.create_train_state` with the member's config,
    from one compiled program."""
    trainer, base = self.trainer, self.trainer.config

    def init_member(seed, hyperparams):
      state = train.create_train_state(base, trainer.model, trainer.tx, seed)
      return state.replace(opt_state=set_hyperparams(state.opt_state, hyperparams))

    seeds = jnp.asarray([c.seed for c in self.configs], jnp.int32)
    hyperparams = {name: jnp.asarray([getattr(c, name) for c in self.configs], jnp.float32)
                   for name in INJECTED_FIELDS}
    return self.place(jax.jit(jax.vmap(init_member))(seeds, hyperparams))

  def place(self, state):
    if self.member_sharding is None:
      return state
    return jax.device_put(state, self.member_sharding)

  def _per_member(self, state, active, run, skip):
    """[run(member state), or skip(member state) where not active] (looped members)."""
    active = [True] * self.size if active is None else active
    return [(run if member_active else skip)(member)
            for member, member_active in zip(unstack_tree(state, self.size), active)]

  def run_epoch(self, state, epoch: int, progress, active=None):
    """One epoch of every member -> (state, per-member sums, per-member train
    seconds; vmapped members share theirs). Looped members that are not
    `active` (diverged) are skipped; vmapped ones compute on, ignored."""
    if self.mode == "vmap":
      return self._vmapped_epoch(state, epoch, progress)

    def skip(member_state):
      progress.update(self.trainer.steps_per_epoch)
      return member_state, {"loss_sum": math.nan, "correct": 0, "nonfinite": True}, 0.0

    run = lambda member_state: train.train_one_epoch(self.trainer, member_state, epoch, progress)
    states, member_sums, seconds = zip(*self._per_member(state, active, run, skip))
    sums = {key: np.array([m[key] for m in member_sums]) for key in ("loss_sum", "correct", "nonfinite")}
    sums["count"] = self.trainer.steps_per_epoch * self.trainer.config.batch_size
    return stack_trees(list(states)), sums, np.array(seconds)

  def _vmapped_epoch(self, state, epoch: int, progress):
    indices = self.epoch_indices(state.seed, epoch)  # [K, steps, batch]
    sums = {"loss_sum": np.zeros(self.size), "correct": np.zeros(self.size, np.int64),
            "count": 0, "nonfinite": np.zeros(self.size, bool)}
    start = time.perf_counter()

    def collect(chunk_sums, steps):
      train.add_chunk_sums(sums, chunk_sums, steps * self.trainer.config.batch_size)
      progress.update(steps * self.size)

    run_chunk = lambda s, chunk: self.train_chunk(s, self.train_images, self.train_labels, chunk)
    state = train.run_chunks(run_chunk, state, self.trainer.chunks(indices), collect)
    return state, sums, np.full(self.size, time.perf_counter() - start)

  def evaluate_all(self, state, active=None):
    """Per-member (test loss sums, test correct counts, seconds) as numpy
    arrays; looped members that are not `active` are skipped (nan)."""
    start = time.perf_counter()
    if self.mode == "vmap":
      totals = self.evaluate(train.model_variables(state), self.test_images, self.test_labels)
      loss_sums, correct = (np.asarray(t) for t in jax.device_get(totals))
      return loss_sums, correct, np.full(self.size, time.perf_counter() - start)

    # Looped members use the base trainer's (unsharded) test set.
    rows = self._per_member(state, active, functools.partial(train.evaluate_test_set, self.trainer),
                            lambda _: (math.nan, 0, 0.0))
    return tuple(np.array(column) for column in zip(*rows))


def train_group(group: Group, dataset, folder: Path, *, progress, log=print,
                stop_after_epoch: int | None = None, mode: str = "auto") -> list[dict]:
  """Trains (or resumes) one group in `folder`; returns its runs' histories."""
  folder.mkdir(parents=True, exist_ok=True)
  configs = [run.config for run in group.runs]
  group_trainer = GroupTrainer(configs, dataset, mode)
  trainer = group_trainer.trainer
  state = group_trainer.init_state()
  saved = {"group": group.id, "epoch": 0,
           "runs": [{"run": run.id, "history": new_history(run.config)} for run in group.runs]}
  manager = checkpoint.make_manager(folder)
  restored = checkpoint.restore_latest(manager, checkpoint.abstract_like(state))
  if restored is not None:
    state, saved = restored
    state = group_trainer.place(state)
    log(f"resumed group {group.id} after epoch {saved['epoch']}")
  histories = [entry["history"] for entry in saved["runs"]]
  for history, config in zip(histories, configs):
    history["config"] = config.to_dict()  # a constant-rate run may have been extended
    if history["status"] == "finished" and len(history["epochs"]) < config.epochs:
      history["status"] = "running"
  num_images = trainer.steps_per_epoch * trainer.config.batch_size
  # A resumed group's progress counts from where it stopped.
  progress.update(saved["epoch"] * trainer.steps_per_epoch * group_trainer.size)

  for epoch in range(saved["epoch"] + 1, group.epochs + 1):
    if stop_after_epoch is not None and epoch > stop_after_epoch:
      break
    active = [h["status"] != "diverged" for h in histories]
    if not any(active):
      break
    state, sums, train_seconds = group_trainer.run_epoch(state, epoch, progress, active)
    test_loss_sums, test_correct, test_seconds = group_trainer.evaluate_all(state, active)
    for k, history in enumerate(histories):
      if not active[k]:
        continue  # diverged earlier: skipped, or (vmapped) computed on and ignored.
      member_sums = {"loss_sum": float(sums["loss_sum"][k]), "correct": int(sums["correct"][k]),
                     "count": sums["count"]}
      record = train._epoch_record(epoch, member_sums, test_loss_sums[k], test_correct[k],
                                   trainer.num_test, float(train_seconds[k]),
                                   float(test_seconds[k]), num_images)
      record["members_in_program"] = group_trainer.size
      record["member_mode"] = group_trainer.mode
      if sums["nonfinite"][k] or not math.isfinite(record["test_loss"]):
        history["status"] = "diverged"
        record["diverged"] = True
        log(f"  {configs[k].network} run {group.runs[k].id}: diverged in epoch {epoch} "
            f"(non-finite loss); its curve stops, the others go on")
      elif epoch == group.epochs:
        history["status"] = "finished"
      history["epochs"].append(record)
    saved["epoch"] = epoch
    accuracies = [h["epochs"][-1]["test_accuracy"] for h in histories
                  if h["status"] != "diverged" and h["epochs"]]
    if epoch % trainer.config.checkpoint_every == 0 or epoch == group.epochs:
      checkpoint.save_checkpoint(manager, epoch, state, saved,
                                 {"test_accuracy": max(accuracies, default=0.0)})
    write_group(folder, saved)
    progress.set_postfix(best_test_acc=f"{max(accuracies, default=0.0):.4f}")
  manager.close()
  write_group(folder, saved)
  return histories


# --- a whole sweep -------------------------------------------------------------------


def _progress(total: int, desc: str, quiet: bool):
  return tqdm(total=total, desc=desc, unit="step", disable=quiet, file=sys.stdout,
              dynamic_ncols=True)


def _steps_per_epoch(config: Config, num_train: int) -> int:
  n = min(config.train_subset, num_train) if config.train_subset else num_train
  return n // config.batch_size


def run_sweep(study: Study, dataset=None, *, quiet: bool = False,
              stop_after_epoch: int | None = None, mode: str = "auto") -> dict:
  """Trains what is missing of `study` and writes its table, figure and
  results into `study.workdir`; returns the results (also `results.json`).

  `mode` says how a group's members share their program: 'vmap', 'loop' or
  'auto' (see `resolve_member_mode`).

  `stop_after_epoch` stops every group after that epoch (as an interruption
  would); the next call resumes.
  """
  log = (lambda *a: None) if quiet else print
  workdir = Path(study.workdir)
  runs = plan_runs(study.members)
  groups = plan_groups(runs.values())
  groups_dir = workdir / GROUPS_DIR
  other_dirs = [d for d in study.reuse_dirs if Path(d) != workdir]
  reusable = index_finished_runs(other_dirs)
  own = index_finished_runs([workdir])

  # What is already done: a planned group whose folder exists resumes (or is
  # skipped when complete) as it is; otherwise runs finished in earlier
  # sweeps (here or in `reuse_dirs`) are taken from there.
  sources: dict[str, tuple[dict, Path]] = {}
  todo: list[Group] = []
  for group in groups:
    if not (groups_dir / group.id).exists():
      continue_shorter_group(group, other_dirs, groups_dir, log)
    saved = read_group(groups_dir / group.id)
    if saved is not None:
      histories = {e["run"]: e["history"] for e in saved["runs"]}
      if all(is_complete(histories[r.id], r.config.epochs) for r in group.runs):
        sources.update({r.id: (histories[r.id], groups_dir / group.id) for r in group.runs})
        continue
      todo.append(group)
      continue
    remaining = []
    for run in group.runs:
      found = own.get(run.id) or reusable.get(run.id)
      if found is not None and is_complete(found[0], run.config.epochs):
        sources[run.id] = found
      else:
        remaining.append(run)
    if remaining:
      todo.append(group if len(remaining) == len(group.runs) else make_group(remaining))

  how = MEMBER_MODE_WORDS[resolve_member_mode(mode)]  # a bad mode fails before any work
  log(f"{study.name}: {len(study.members)} members -> {len(runs)} runs in {len(groups)} "
      f"groups; {len(todo)} to train, {len(runs) - sum(len(g.runs) for g in todo)} done")
  if todo:
    if dataset is None:
      dataset = data_lib.load_cifar10(study.members[0].config.data or None)
    num_train = len(dataset.train_images)
    for group in todo:
      config = group.runs[0].config
      if config.batch_size > min(config.train_subset or num_train, num_train):
        raise ValueError(f"batch size {config.batch_size} is larger than the training set "
                         f"({min(config.train_subset or num_train, num_train)} images)")
    total = sum(group.epochs * len(group.runs) * _steps_per_epoch(group.runs[0].config, num_train)
                for group in todo)
    with _progress(total, study.name, quiet) as progress:
      for index, group in enumerate(todo, 1):
        members = f", {len(group.runs)} {how}" if len(group.runs) > 1 else ""
        progress.set_description(f"{study.name} group {index}/{len(todo)}{members}")
        folder = groups_dir / group.id
        histories = train_group(group, dataset, folder, progress=progress, log=log,
                                stop_after_epoch=stop_after_epoch, mode=mode)
        sources.update({run.id: (h, folder) for run, h in zip(group.runs, histories)})
        if index < len(todo):  # the table fills in as groups finish
          write_outputs(study, collect_results(study, runs, sources))
  results = collect_results(study, runs, sources)
  write_outputs(study, results)
  return results


def collect_results(study: Study, runs: dict[str, Run], sources) -> dict:
  members = []
  for member in study.members:
    rid = run_id(member.config)
    history, folder = sources.get(rid, (new_history(runs[rid].config), None))
    members.append({
        "label": member.label, "values": dict(member.values), "run": rid,
        "run_epochs": runs[rid].config.epochs,
        "trained_in": str(folder) if folder is not None else None,
        "history": member_history(history, member.config.epochs)})
  return {"study": study.name, "fields": list(study.fields), "command": study.command,
          "network": study.members[0].config.network,
          "protocol": study.members[0].config.protocol, "members": members}


# --- outputs -------------------------------------------------------------------------


def _fmt(value, digits=4) -> str:
  if value is None:
    return "-"
  if isinstance(value, float) and not math.isfinite(value):
    return "nan"
  return f"{value:.{digits}f}"


def member_note(entry: dict, study_dir: Path) -> str:
  history = entry["history"]
  notes = []
  if history["status"] == "diverged":
    notes.append(f"**diverged** in epoch {history['epochs'][-1]['epoch']}")
  elif history["status"] != "finished":
    notes.append("unfinished")
  if entry["run_epochs"] > len(history["epochs"]) and history["status"] == "finished":
    notes.append(f"epochs 1-{len(history['epochs'])} of the {entry['run_epochs']}-epoch run")
  trained_in = entry["trained_in"]
  records = history["epochs"]
  if trained_in and Path(trained_in).parent.parent.resolve() != Path(study_dir).resolve():
    notes.append(f"run shared with {Path(trained_in).parent.parent.name}")
  elif records and records[-1].get("members_in_program", 1) > 1:
    others = records[-1]["members_in_program"] - 1
    how = MEMBER_MODE_WORDS.get(records[-1].get("member_mode"), "looped")
    notes.append(f"one program with {others} others ({how})")
  return "; ".join(notes)


def format_table(results: dict, study_dir: Path) -> str:
  fields = results["fields"]
  header = [FIELD_TITLES.get(f, f.replace("_", " ")) for f in fields] + [
      "train acc", "test acc", "train loss", "test loss", "time (s)", "epoch", "note"]
  lines = [f"# {results['network']} {results['study']} study ({results['protocol']} protocol)", ""]
  if results["command"]:
    lines += [f"Made by `{results['command']}`.", ""]
  if results["study"] == "epochs" or any(
      e["run_epochs"] > len(e["history"]["epochs"]) and e["history"]["status"] == "finished"
      for e in results["members"]):
    lines += ["With a constant learning rate the shorter runs need no training of their own: "
              "their rows are the longest run's history at those epochs (same seed, same "
              "data order).", ""]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for entry in results["members"]:
    records = entry["history"]["epochs"]
    last = records[-1] if records else {}
    cells = [format_value(entry["values"][f]) for f in fields]
    cells += [_fmt(last.get("train_accuracy")), _fmt(last.get("test_accuracy")),
              _fmt(last.get("train_loss")), _fmt(last.get("test_loss")),
              _fmt(sum(r["seconds"] for r in records), 1) if records else "-",
              str(last.get("epoch", "-")), member_note(entry, study_dir)]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "Accuracies and losses are the final epoch's; time is the wall time of the "
            "member's epochs, evaluation included (vmapped members share theirs).", ""]
  return "\n".join(lines)


def write_outputs(study: Study, results: dict) -> None:
  workdir = Path(study.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  tmp = workdir / "results.json.tmp"
  tmp.write_text(json.dumps(results, indent=1) + "\n")
  os.replace(tmp, workdir / "results.json")
  (workdir / "table.md").write_text(format_table(results, workdir))
  title = f"{results['network']}: {results['study']} study ({results['protocol']} protocol)"
  plots.plot_study(title, [(e["label"], e["history"]) for e in results["members"]],
                   workdir / "figure.png")
