"""Hyperparameter sweeps: the original's six GoogLeNet studies, or any grid.

  python -m experiments.sweeps learning_rate          # or optimizer, loss, activation,
  python -m experiments.sweeps all                    #    batch_size, epochs
  python -m experiments.sweeps epochs --epochs 1 --train-subset 2000 --data DIR
  python -m experiments.sweeps --model resnet18 --grid lr=1e-3,3e-3 --grid wd=0,5e-4 \\
      --grid seed=0,1,2 --protocol recipe

A study changes one thing of the seed protocol on GoogLeNet (inception10) and
writes table.md, results.json and figure.png into ckpt/sweeps/<study>
(--workdir; for `all` the parent folder). A grid sweep trains the product of
its --grid options (aliases: lr, wd, bs, opt, act, ls, mom) on --model with
any other Config option. Members that differ only in learning rate, weight
decay, momentum or seed train together in one compiled program (vmapped on an
accelerator; on the CPU, where vmap measured no faster, one member after
another: --member-mode). Re-running a command skips what is finished and
resumes what was interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from pathlib import Path

from cifar_flax.config import (add_config_arguments, canonical_network, make_config,
                               overrides_from_args)

STUDY_NAMES = ("learning_rate", "optimizer", "loss", "activation", "batch_size", "epochs")
SWEEPS_ROOT = Path("ckpt/sweeps")
# Experiment modules that hold each network's recipe (config.RECIPE_BASE + these).
RECIPE_MODULES = {"inception10": "googlenet"}


def network_recipe(network: str) -> dict:
  module = importlib.import_module(f"experiments.{RECIPE_MODULES.get(network, network)}")
  return dict(getattr(module, "RECIPE", {}))


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m experiments.sweeps", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("study", nargs="?", choices=STUDY_NAMES + ("all",),
                      help="one of the original's GoogLeNet studies, or all of them")
  parser.add_argument("--model", "--network", dest="model",
                      help="network of a grid sweep (with --grid)")
  parser.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2,...",
                      help="values of one Config field (repeat: the product is swept)")
  parser.add_argument("--reuse", action="append", default=[], metavar="DIR",
                      help="other sweep folders whose finished runs may be reused")
  parser.add_argument("--member-mode", choices=("auto", "vmap", "loop"), default="auto",
                      help="how a group's members share one compiled program: vmap, or "
                           "loop (one member after another); auto: loop on CPU, else vmap")
  add_config_arguments(parser, skip=("network",))
  return parser


def make_studies(args, command: str):
  """The Study objects the arguments ask for."""
  from cifar_flax import sweep  # imports jax: after parsing, so --help is fast.
  overrides = overrides_from_args(args)
  protocol = overrides.pop("protocol", "seed")
  workdir = overrides.pop("workdir", None)
  if args.study:
    if args.model or args.grid:
      raise ValueError("give either a study name or --model with --grid, not both")
    recipe = network_recipe(sweep.STUDY_NETWORK) if protocol == "recipe" else None
    root = Path(workdir) if workdir and args.study == "all" else SWEEPS_ROOT
    if protocol != "seed" and not workdir:
      root = root / protocol
    names = STUDY_NAMES if args.study == "all" else (args.study,)
    folder = lambda name: Path(workdir) if workdir and args.study != "all" else root / name
    return [sweep.make_study(name, folder(name), command, protocol=protocol, recipe=recipe,
                             **overrides) for name in names]
  if not args.model:
    raise ValueError("give a study name (" + ", ".join(STUDY_NAMES + ("all",)) + ") or "
                     "--model NETWORK with --grid FIELD=V1,V2,...")
  network = canonical_network(args.model)
  grid = sweep.parse_grid(args.grid)
  recipe = network_recipe(network) if protocol == "recipe" else None
  base = make_config(network, protocol, recipe, **overrides)
  name = f"{network}-{protocol}-" + "-".join(grid)
  return [sweep.Study(name=name, fields=tuple(grid), members=sweep.grid_members(base, grid),
                      workdir=Path(workdir) if workdir else SWEEPS_ROOT / name,
                      command=command, reuse_dirs=tuple(Path(d) for d in args.reuse))]


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args = build_parser().parse_args(argv)
  command = shlex.join(["python", "-m", "experiments.sweeps", *argv])
  try:
    studies = make_studies(args, command)
    from cifar_flax import sweep
    for study in studies:
      results = sweep.run_sweep(study, quiet=bool(args.quiet), mode=args.member_mode)
      print((study.workdir / "table.md").read_text())
      print(f"{study.name}: results in {study.workdir}/{{table.md,results.json,figure.png}}")
      unfinished = [m["label"] for m in results["members"]
                    if m["history"]["status"] not in ("finished", "diverged")]
      if unfinished:
        print(f"unfinished members: {', '.join(unfinished)}", file=sys.stderr)
  except (ValueError, FileNotFoundError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("\ninterrupted; run the same command again to resume", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
