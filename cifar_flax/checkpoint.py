"""Checkpoints with orbax: the full train state for exact resume, and a small
params-only export that the predictor and the desktop app load.

A run folder looks like::

    ckpt/<network>-<protocol>[-<tag>]/
      config.json  history.json  curves.png
      checkpoints/<step>/{state,history}   (orbax; last 3 epochs + the best)
      inference/{variables/,meta.json}     (params + batch_stats of the last epoch)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from cifar_flax.data import CLASS_NAMES

INFERENCE_DIR = "inference"
CHECKPOINT_DIR = "checkpoints"


def make_manager(run_dir: Path, keep: int = 3) -> ocp.CheckpointManager:
  """Keeps the last `keep` checkpoints and the best one by test accuracy.

  Saves are synchronous: orbax writes into a `*.orbax-checkpoint-tmp` folder
  and renames it when complete, so a crash mid-save leaves the previous
  checkpoint as the latest; the manager ignores the unfinished folder.
  """
  policies = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policies.AnyPreservationPolicy([
          policies.LatestN(n=keep),
          policies.BestN(get_metric_fn=lambda m: m["test_accuracy"], n=1),
      ]),
      enable_async_checkpointing=False,
      create=True,
  )
  return ocp.CheckpointManager((Path(run_dir) / CHECKPOINT_DIR).absolute(), options=options)


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state: Any, history: dict,
                    metrics: dict) -> None:
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             history=ocp.args.JsonSave(history)),
               metrics=metrics)
  manager.wait_until_finished()


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any):
  """(state, history) of the latest complete checkpoint, or None.

  Restoring against an abstract target keeps optax's container types (a
  target-less restore turns its named tuples into dicts).
  """
  step = manager.latest_step()
  if step is None:
    return None
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), history=ocp.args.JsonRestore()))
  return restored.state, restored.history


def abstract_like(tree: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


# --- params-only export for inference ------------------------------------------


@dataclasses.dataclass(frozen=True)
class InferenceBundle:
  network: str
  model_options: dict
  variables: dict
  normalization: str
  class_names: tuple
  epoch: int
  test_accuracy: float
  run_dir: Path


def save_inference(run_dir, *, network: str, model_options: dict, variables: dict,
                   normalization: str, epoch: int, test_accuracy: float) -> Path:
  """Writes run_dir/inference atomically: a new folder, then a swap."""
  run_dir = Path(run_dir)
  final = run_dir / INFERENCE_DIR
  staging = run_dir / (INFERENCE_DIR + ".new")
  shutil.rmtree(staging, ignore_errors=True)
  staging.mkdir(parents=True)
  variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save((staging / "variables").absolute(), variables)
  meta = dict(network=network, model_options=model_options, normalization=normalization,
              class_names=list(CLASS_NAMES), epoch=int(epoch),
              test_accuracy=float(test_accuracy))
  (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
  old = run_dir / (INFERENCE_DIR + ".old")
  shutil.rmtree(old, ignore_errors=True)
  if final.exists():
    os.rename(final, old)
  os.rename(staging, final)
  shutil.rmtree(old, ignore_errors=True)
  return final


def load_inference(run_dir) -> InferenceBundle:
  run_dir = Path(run_dir)
  folder = run_dir / INFERENCE_DIR
  if not (folder / "meta.json").is_file():
    raise FileNotFoundError(
        f"{run_dir} has no trained params ({folder}/meta.json is missing); train one with "
        f"`python -m experiments.<network>` or pass a run folder under ckpt/")
  meta = json.loads((folder / "meta.json").read_text())
  with ocp.StandardCheckpointer() as checkpointer:
    variables = checkpointer.restore((folder / "variables").absolute())
  return InferenceBundle(network=meta["network"], model_options=meta["model_options"],
                         variables=dict(variables), normalization=meta["normalization"],
                         class_names=tuple(meta["class_names"]), epoch=meta["epoch"],
                         test_accuracy=meta["test_accuracy"], run_dir=run_dir)


def find_runs(network: str, ckpt_root="ckpt") -> list[Path]:
  """Run folders for `network` that hold an inference export, best first."""
  from cifar_flax.config import canonical_network
  network = canonical_network(network)
  runs = []
  for meta_path in Path(ckpt_root).glob(f"*/{INFERENCE_DIR}/meta.json"):
    meta = json.loads(meta_path.read_text())
    if meta.get("network") == network:
      runs.append((meta.get("test_accuracy", 0.0), meta_path.parent.parent))
  return [path for _, path in sorted(runs, key=lambda item: -item[0])]
