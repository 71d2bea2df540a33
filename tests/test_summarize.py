"""experiments.summarize: the results table, summary.json and the README block
come from the run folders' histories, and unfinished runs say so."""

import json
from pathlib import Path

import pytest

from experiments import summarize


def _write_run(ckpt, name, accuracies, status, planned=10, seconds=10.0, timed_evaluation=True):
  run = ckpt / name
  run.mkdir(parents=True)
  epochs = [{"epoch": i + 1, "test_accuracy": a, "seconds": seconds} for i, a in enumerate(accuracies)]
  if timed_evaluation:
    epochs = [{**r, "test_seconds": 1.0} for r in epochs]
  history = {"network": name.split("-")[0], "protocol": name.split("-")[1], "status": status,
             "machine": "test machine", "epochs": epochs}
  (run / "history.json").write_text(json.dumps(history))
  (run / "config.json").write_text(json.dumps({"epochs": planned}))
  return run


@pytest.fixture
def ckpt(tmp_path):
  root = tmp_path / "ckpt"
  _write_run(root, "lenet5-seed", [0.3, 0.5, 0.45], "finished", planned=3, seconds=2.5)
  _write_run(root, "vgg16-recipe", [0.4, 0.6], "running", timed_evaluation=False)
  _write_run(root, "alexnet8-seed", [0.2, float("nan")], "diverged")
  return root


def test_summary_lists_every_run_with_its_own_numbers(ckpt, tmp_path):
  results = tmp_path / "results"
  written = summarize.write_results(ckpt, results)

  entries = {(e["network"], e["protocol"]): e for e in json.loads((results / "summary.json").read_text())}
  assert set(entries) == {("lenet5", "seed"), ("vgg16", "recipe"), ("alexnet8", "seed")}
  lenet = entries["lenet5", "seed"]
  assert lenet["test_accuracy"] == 0.45 and lenet["best_test_accuracy"] == 0.5
  assert lenet["epochs"] == 3 and lenet["wall_seconds"] == 7.5 and lenet["status"] == "finished"
  assert entries["vgg16", "recipe"]["status"] == "running"
  assert lenet["wall_includes_evaluation"] and not entries["vgg16", "recipe"]["wall_includes_evaluation"]

  rows = {line.split(" | ")[0].strip("| "): line for line in written["markdown_table"].splitlines()[2:]}
  assert "45.00% (best 50.00%)" in rows["LeNet-5"] and "8s / -" in rows["LeNet-5"]
  assert "60.00% (best 60.00%), 2/10 epochs so far" in rows["VGG16"] and "- / 20s†" in rows["VGG16"]
  assert "† training time only" in written["markdown_table"]
  assert "diverged" in rows["AlexNet"]
  assert rows["ResNet-18"].count("not run yet") == 2
  assert (results / "runs" / "lenet5-seed" / "history.json").exists()
  assert not (results / "runs" / "resnet18-seed").exists()


def test_a_run_missing_from_ckpt_keeps_its_record_in_results(ckpt, tmp_path):
  """ckpt/ is git-ignored: a fresh clone has lost the big runs, results/ still holds them."""
  results = tmp_path / "results"
  _write_run(results / "runs", "resnet18-recipe", [0.5, 0.8], "running")
  _write_run(results / "runs", "vgg16-recipe", [0.1], "running")  # ckpt/ has a newer one

  written = summarize.write_results(ckpt, results)

  rows = {line.split(" | ")[0].strip("| "): line for line in written["markdown_table"].splitlines()[2:]}
  assert "80.00% (best 80.00%), 2/10 epochs so far" in rows["ResNet-18"]
  assert "60.00% (best 60.00%), 2/10 epochs so far" in rows["VGG16"]
  copied = json.loads((results / "runs" / "vgg16-recipe" / "history.json").read_text())
  assert [r["test_accuracy"] for r in copied["epochs"]] == [0.4, 0.6]
  entries = {(e["network"], e["protocol"]) for e in json.loads((results / "summary.json").read_text())}
  assert ("resnet18", "recipe") in entries


def test_readme_block_is_replaced_and_the_rest_kept(ckpt, tmp_path):
  table = summarize.write_results(ckpt, tmp_path / "results")["markdown_table"]
  readme = tmp_path / "README.md"
  readme.write_text(f"intro\n{summarize.README_BEGIN}\n| old | table |\n{summarize.README_END}\noutro\n")

  assert summarize.update_readme(readme, table)
  once = readme.read_text()
  assert once == f"intro\n{summarize.README_BEGIN}\n{table}\n{summarize.README_END}\noutro\n"
  assert summarize.update_readme(readme, table) and readme.read_text() == once  # idempotent


def test_readme_without_markers_is_untouched_and_half_a_block_is_an_error(tmp_path):
  readme = tmp_path / "README.md"
  readme.write_text("no table here\n")
  assert not summarize.update_readme(readme, "| t |")
  assert readme.read_text() == "no table here\n"
  readme.write_text(f"{summarize.README_BEGIN}\n| t |\n")
  with pytest.raises(ValueError, match="end of summary table"):
    summarize.update_readme(readme, "| t |")


def test_committed_readme_matches_committed_results():
  """The README's block is what summarize wrote into results/summary.md."""
  root = Path(__file__).resolve().parents[1]
  readme, summary = (root / "README.md").read_text(), (root / "results" / "summary.md").read_text()
  block = readme.split(summarize.README_BEGIN, 1)[1].split(summarize.README_END, 1)[0].strip()
  assert block and block in summary
