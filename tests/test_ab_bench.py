"""tools/ab_bench.py: variants parse, overrides apply at trace time only, records are paired."""

import importlib.util
from pathlib import Path

import pytest

from cifar_flax.models import layers
from tests.conftest import make_tiny_dataset

SPEC = importlib.util.spec_from_file_location(
    "ab_bench", Path(__file__).resolve().parents[1] / "tools" / "ab_bench.py")
ab_bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(ab_bench)


def test_parse_variant():
  assert ab_bench.parse_variant("base") == ("base", {})
  # XLA options are compile options, not module attributes: not looked up in cifar_flax.
  spec = 'serial:{"xla_cpu_multi_thread_eigen": false, "models.layers.HYBRID_CONV_CHUNK": 64}'
  name, overrides = ab_bench.parse_variant(spec)
  assert ab_bench.split_overrides(overrides) == (
      {"models.layers.HYBRID_CONV_CHUNK": 64}, {"xla_cpu_multi_thread_eigen": False})
  assert ab_bench.parse_variant('wide:{"models.layers.HYBRID_CONV_CHUNK": 64}') == (
      "wide", {"models.layers.HYBRID_CONV_CHUNK": 64})


@pytest.mark.parametrize("spec, message", [
    (":{}", "no name"),
    ('x:[1]', "JSON object"),
    ('x:{"HYBRID_CONV_CHUNK": 1}', "MODULE.ATTR"),
    ('x:{"models.layers.NO_SUCH_THRESHOLD": 1}', "no attribute"),
])
def test_bad_variants_fail_before_compiling(spec, message):
  with pytest.raises(ValueError, match=message):
    ab_bench.parse_variant(spec)


def test_overrides_are_restored():
  before = layers.HYBRID_CONV_CHUNK
  with pytest.raises(RuntimeError):
    with ab_bench.overridden({"models.layers.HYBRID_CONV_CHUNK": before + 1}):
      assert layers.HYBRID_CONV_CHUNK == before + 1
      raise RuntimeError
  assert layers.HYBRID_CONV_CHUNK == before


def test_compare_records_paired_rounds(capsys):
  # The banded conv takes LeNet-5's layers at up to 8 input channels; at 0 they go to the
  # native path instead: a different program, the same arithmetic up to rounding.
  variants = [ab_bench.parse_variant("base"),
              ab_bench.parse_variant('native:{"models.layers.HYBRID_GEMM_MAX_CHANNELS": 0}')]
  records = ab_bench.compare("lenet5", 4, 2, 2, variants, make_tiny_dataset(16, 10))
  base, native = records
  assert [r["variant"] for r in records] == ["base", "native"]
  assert base["paired_ratio"] == 1.0 and base["rounds_faster"] == 0 and len(base["rates"]) == 2
  assert native["rounds"] == 2 and native["median_img_s"] > 0
  assert native["first_loss_sum"] == pytest.approx(base["first_loss_sum"], rel=1e-4)
  assert layers.HYBRID_GEMM_MAX_CHANNELS == 8  # restored after tracing
  assert capsys.readouterr().err.count("round ") == 2


def test_compare_passes_xla_options_to_the_compile():
  variants = [ab_bench.parse_variant("base"),
              ab_bench.parse_variant('serial:{"xla_cpu_multi_thread_eigen": false}')]
  base, serial = ab_bench.compare("lenet5", 4, 2, 1, variants, make_tiny_dataset(16, 10))
  assert serial["first_loss_sum"] == pytest.approx(base["first_loss_sum"], rel=1e-4)
  with pytest.raises(Exception, match="xla_no_such_option"):
    ab_bench.compare("lenet5", 4, 2, 1, [ab_bench.parse_variant('x:{"xla_no_such_option": 1}')],
                     make_tiny_dataset(16, 10))


def test_call_order_rotates_so_no_variant_always_follows_another():
  assert [ab_bench.call_order(3, r) for r in range(4)] == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]
  assert ab_bench.call_order(1, 5) == [0]
