"""tools/gpu_bench.py: grids parse or fail early; a tiny sitting writes its records and table."""

import importlib.util
import json
from pathlib import Path

import pytest

from cifar_flax import data as data_lib
from cifar_flax.models import MODEL_NAMES
from tests.conftest import make_tiny_dataset

SPEC = importlib.util.spec_from_file_location(
    "gpu_bench", Path(__file__).resolve().parents[1] / "tools" / "gpu_bench.py")
gpu_bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(gpu_bench)


def test_parse_grid():
  assert gpu_bench.parse_grid("lenet5,googlenet:32,128:float32:auto") == [
      ("lenet5", 32, "float32", "auto"), ("lenet5", 128, "float32", "auto"),
      ("inception10", 32, "float32", "auto"), ("inception10", 128, "float32", "auto")]
  grid = gpu_bench.parse_grid("all:128:float32,bfloat16:xla,gemm")
  assert len(grid) == len(MODEL_NAMES) * 4 and grid[0] == (MODEL_NAMES[0], 128, "float32", "xla")


@pytest.mark.parametrize("spec, message", [
    ("lenet5:32:float32", "MODELS:BATCHES:DTYPES:CONVS"),
    ("lenet5:b32:float32:auto", "integers"),
    ("lenet5:0:float32:auto", "positive"),
    ("lenet5:32:float16:auto", "unknown dtype"),
    ("lenet5:32:float32:fft", "unknown conv"),
    ("lenet6:32:float32:auto", "lenet6"),
])
def test_bad_grids_fail_before_measuring(spec, message):
  with pytest.raises(ValueError, match=message):
    gpu_bench.parse_grid(spec)


def test_tiny_sitting_writes_records_and_table(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(data_lib, "load_cifar10", lambda source=None: make_tiny_dataset())
  out = tmp_path / "bench"
  code = gpu_bench.main(["--out", str(out), "--grid", "lenet5:8:float32:auto", "--grid", "lenet5:8:float32:xla",
                         "--steps", "2", "--windows", "1", "--peak-size", "64"])
  assert code == 0
  records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
  assert [(r["model"], r["batch"], r["conv"]) for r in records] == [("lenet5", 8, "auto"), ("lenet5", 8, "xla")]
  for r in records:
    assert r["train_img_s"] > 0 and r["eval_img_s"] > 0 and r["peak_gflops"] > 0
    # the fraction of the figures in the record (with --peak-size 64 the peak is a few GFLOP/s,
    # where rounding it to 0.1 moves a fraction computed from the unrounded peak by over 1%)
    assert r["flops_fraction"] == pytest.approx(r["train_gflops"] / r["peak_gflops"], rel=1e-3)
  table = out.with_suffix(".md").read_text()
  assert table.count("| lenet5 | 8 | float32 |") == 2 and "bfloat16" in table


def test_budget_stops_starting_records(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(data_lib, "load_cifar10", lambda source=None: make_tiny_dataset())
  out = tmp_path / "bench"
  code = gpu_bench.main(["--out", str(out), "--grid", "lenet5:8:float32:xla", "--budget-s", "0",
                         "--peak-size", "64"])
  assert code == 1 and out.with_suffix(".jsonl").read_text() == ""
  assert "not measured: lenet5:8:float32:xla" in capsys.readouterr().out
