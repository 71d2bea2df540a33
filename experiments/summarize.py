"""Collect finished runs and studies from ckpt/ into results/ with one summary.

  python -m experiments.summarize [--ckpt ckpt] [--results results] [--readme README.md]

Every number comes from a history.json that a run wrote; a run that has not
finished is listed as "not run yet" (or with the epochs it has so far). A run
whose folder is not in ckpt/ (a fresh clone ships only the small ones) keeps
the record already in results/runs/. The
summary table is also written into the README between its two marker lines,
so the README cannot drift from results/.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

NETWORKS = (("lenet5", "LeNet-5", 0.52), ("alexnet8", "AlexNet", 0.66), ("vgg16", "VGG16", 0.79),
            ("inception10", "GoogLeNet", 0.73), ("resnet18", "ResNet-18", 0.80))
RUN_FILES = ("history.json", "curves.png", "config.json")
STUDY_FILES = ("table.md", "results.json", "figure.png")
TRAINING_ONLY_MARK = "†"
README_BEGIN = "<!-- summary table: written by `python -m experiments.summarize`, do not edit -->"
README_END = "<!-- end of summary table -->"


def _load_history(run_dir: Path) -> dict | None:
  path = run_dir / "history.json"
  return json.loads(path.read_text()) if path.exists() else None


def _run_dir(ckpt: Path, results: Path, name: str) -> Path:
  """The run folder in ckpt/ when it holds a history, else the copy already in results/runs/.

  ckpt/ is git-ignored, so a fresh clone (or a new machine) has only the runs it ships;
  results/ is the record, and a summary must not forget a run because its folder is gone.
  """
  run_dir = ckpt / name
  return run_dir if (run_dir / "history.json").exists() else results / "runs" / name


def _copy_files(source: Path, target: Path, names) -> None:
  """Copies the named files that ``source`` has into ``target`` (nothing when they are one)."""
  if source == target:  # a record kept from results/ is already in place
    return
  target.mkdir(parents=True, exist_ok=True)
  for name in names:
    if (source / name).exists():
      shutil.copy2(source / name, target / name)


def _cell(history: dict | None, planned_epochs: int = 10) -> str:
  if not history or not history["epochs"]:
    return "not run yet"
  last = history["epochs"][-1]
  best = max(r["test_accuracy"] for r in history["epochs"])
  text = f"{last['test_accuracy']:.2%} (best {best:.2%})"
  if history["status"] == "diverged":
    return text + ", diverged"
  if history["status"] != "finished":
    return text + f", {len(history['epochs'])}/{planned_epochs} epochs so far"
  return text


def write_results(ckpt: Path, results: Path, command: str = "python -m experiments.summarize") -> dict:
  results.mkdir(parents=True, exist_ok=True)
  rows, summary = [], []
  for network, title, original in NETWORKS:
    cells, seconds, machines = {}, {}, set()
    for protocol in ("seed", "recipe"):
      run_dir = _run_dir(ckpt, results, f"{network}-{protocol}")
      history = _load_history(run_dir)
      planned = json.loads((run_dir / "config.json").read_text())["epochs"] if history else 10
      cells[protocol] = _cell(history, planned)
      if history and history["epochs"]:
        _copy_files(run_dir, results / "runs" / run_dir.name, RUN_FILES)
        wall = sum(r["seconds"] for r in history["epochs"])
        # Runs recorded before train.fit timed its asynchronous test evaluation
        # have training-only epoch times (no "test_seconds" in their records).
        with_evaluation = all("test_seconds" in r for r in history["epochs"])
        seconds[protocol] = f"{wall:.0f}s" + ("" if with_evaluation else TRAINING_ONLY_MARK)
        machines.add(history.get("machine", "unknown"))
        summary.append(dict(network=network, protocol=protocol, epochs=len(history["epochs"]),
                            status=history["status"],
                            test_accuracy=history["epochs"][-1]["test_accuracy"],
                            best_test_accuracy=max(r["test_accuracy"] for r in history["epochs"]),
                            wall_seconds=round(wall, 1), wall_includes_evaluation=with_evaluation,
                            machine=history.get("machine", "unknown")))
    time_text = " / ".join(seconds.get(p, "-") for p in ("seed", "recipe"))
    rows.append(f"| {title} | ~{original:.0%} | {cells['seed']} | {cells['recipe']} | 10 | "
                f"{time_text} | {'; '.join(sorted(machines)) or '-'} |")
  markdown_table = "\n".join([
      "| network | original | `seed` protocol | `recipe` protocol | epochs | wall time seed / recipe | machine |",
      "|---|---|---|---|---|---|---|", *rows])
  if not all(entry["wall_includes_evaluation"] for entry in summary):
    markdown_table += (f"\n\n{TRAINING_ONLY_MARK} training time only: these runs were recorded before "
                       "the epoch times included the test evaluation, which ran but was not timed.")
  table = (f"Made by `{command}` on CIFAR-10 (JPEG copy). Test accuracy after the final epoch "
           f"(best epoch in brackets).\n\n{markdown_table}\n")
  (results / "summary.md").write_text(table)
  (results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

  for study_dir in sorted((ckpt / "sweeps").glob("*")) if (ckpt / "sweeps").exists() else []:
    if (study_dir / "table.md").exists():
      _copy_files(study_dir, results / "studies" / study_dir.name, STUDY_FILES)
  return {"summary": summary, "table": table, "markdown_table": markdown_table}


def update_readme(readme: Path, markdown_table: str) -> bool:
  """Replaces what lies between the README's marker lines with the table.

  Returns False (and writes nothing) when the README has neither marker.
  """
  text = readme.read_text()
  has_begin, has_end = README_BEGIN in text, README_END in text
  if not has_begin and not has_end:
    return False
  if not (has_begin and has_end) or text.index(README_BEGIN) > text.index(README_END):
    raise ValueError(f"{readme}: expected the line {README_BEGIN!r} and, after it, {README_END!r}")
  head, rest = text.split(README_BEGIN, 1)
  _, tail = rest.split(README_END, 1)
  readme.write_text(f"{head}{README_BEGIN}\n{markdown_table}\n{README_END}{tail}")
  return True


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--ckpt", type=Path, default=Path("ckpt"))
  parser.add_argument("--results", type=Path, default=Path("results"))
  parser.add_argument("--readme", type=Path, default=Path("README.md"),
                      help="README whose summary table (between its marker lines) is rewritten")
  args = parser.parse_args(argv)
  written = write_results(args.ckpt, args.results)
  print(written["table"])
  if args.readme.exists() and update_readme(args.readme, written["markdown_table"]):
    print(f"updated the summary table in {args.readme}")


if __name__ == "__main__":
  main()
