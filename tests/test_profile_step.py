"""tools/profile_step.py: HLO parsing, op names to layers, a real profiled chunk summed."""

import importlib.util
from pathlib import Path

import pytest

from tests.conftest import make_tiny_dataset

SPEC = importlib.util.spec_from_file_location(
    "profile_step", Path(__file__).resolve().parents[1] / "tools" / "profile_step.py")
profile_step = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(profile_step)

HLO = """
  %ynn_fusion.15 = f32[25088,24]{1,0} fusion(%a, %b), kind=kCustom, calls=%f15, metadata={op_name="jit(train_chunk)/while/body/closed_call/jvp(LeNet5)/Conv_0/dot_general" stack_frame_id=248}, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
  %dot_general.116 = f32[24,120]{1,0} dot(%c, %d), lhs_contracting_dims={0}, rhs_contracting_dims={0}, metadata={op_name="jit(train_chunk)/while/body/closed_call/transpose(jvp(LeNet5))/Conv_0/dot_general"}
  %multi.1 = (f32[128,16,16,16]{3,2,1,0}, s8[128,8,8,16]{3,2,1,0}) fusion(%e), kind=kLoop, calls=%f1, metadata={op_name="jit(train_chunk)/while/body/closed_call/jvp(Inception10)/InceptionBlock_0/ConvBNAct_1/BatchNorm_0/mul"}
  %while.3 = (s32[], f32[10]{0}) while(%t), condition=%cond, body=%body
  ROOT %add.7 = f32[] add(%x, %y), metadata={op_name="jit(train_chunk)/while/body/closed_call/mul"}
"""


def test_parse_instructions():
  ops = profile_step.parse_instructions(HLO)
  assert ops["ynn_fusion.15"] == {"shape": "f32[25088,24]", "opcode": "fusion", "kind": "matmul",
                                  "layer": "Conv_0", "pass": "forward"}
  assert ops["dot_general.116"]["kind"] == "matmul" and ops["dot_general.116"]["pass"] == "backward"
  assert ops["multi.1"]["shape"] == "f32[128,16,16,16]"  # a tuple's first output
  assert ops["multi.1"]["kind"] == "elementwise"
  assert ops["multi.1"]["layer"] == "InceptionBlock_0/ConvBNAct_1/BatchNorm_0"
  assert ops["while.3"]["kind"] == "control"
  assert ops["add.7"]["layer"] == "(outside the model)" and ops["add.7"]["pass"] == "other"
  assert profile_step.minor_dim("f32[128,16,16,16]") == "16"
  assert profile_step.minor_dim("f32[]") == "scalar"


def test_summarize_sums_per_step_and_skips_control():
  ops = profile_step.parse_instructions(HLO)
  events = [{"name": "ynn_fusion.15", "ts": 0, "dur": 3000}, {"name": "ynn_fusion.15", "ts": 9000, "dur": 1000},
            {"name": "dot_general.116", "ts": 4000, "dur": 2000}, {"name": "while.3", "ts": 0, "dur": 99000},
            {"name": "ThunkExecutor::Execute", "ts": 0, "dur": 50000}]
  summary = profile_step.summarize(events, ops, steps=2)
  assert summary["ops_ms"] == 3.0  # (3 + 1 + 2 ms) over 2 steps; while and executor left out
  assert [op["op"] for op in summary["ops"]] == ["ynn_fusion.15", "dot_general.116"]
  assert summary["layers"]["Conv_0"] == {"forward": 2.0, "backward": 1.0, "other": 0.0}
  assert summary["minor_dims"] == {"matmul, minor dim 24": 2.0, "matmul, minor dim 120": 1.0}


def test_async_ops_listed_apart_with_their_latency():
  # dot_general.116 runs twice, dispatched at 0 and 10,000 us (20 us each), done at 3,000 and
  # 14,000; ynn_fusion.15's end event follows its run: synchronous
  events = [{"name": "dot_general.116", "ts": 10000, "dur": 20}, {"name": "dot_general.116", "ts": 0, "dur": 20},
            {"name": "end: dot_general.116", "ts": 2990, "dur": 10},
            {"name": "end: dot_general.116", "ts": 13990, "dur": 10},
            {"name": "ynn_fusion.15", "ts": 100, "dur": 500}, {"name": "end: ynn_fusion.15", "ts": 600, "dur": 1}]
  durations, latencies = profile_step.op_durations(events)
  assert durations == {"dot_general.116": 40, "ynn_fusion.15": 500}
  assert latencies == {"dot_general.116": 7000}
  summary = profile_step.summarize(events, profile_step.parse_instructions(HLO), steps=1)
  assert summary["ops_ms"] == 0.54
  assert [(op["op"], op["latency_ms"]) for op in summary["async_ops"]] == [("dot_general.116", 7.0)]


def test_profile_a_real_chunk():
  result = profile_step.profile("lenet5", 4, 2, 1, make_tiny_dataset(16, 10))
  assert result["ops"] and result["ops_ms"] > 0 and result["step_ms"] > 0
  assert set(result["kinds"]) == {"matmul", "elementwise"}
  conv = result["layers"]["Conv_0"]
  assert conv["forward"] > 0 and conv["backward"] > 0
  assert "(outside the model)" in result["layers"]  # loss and Adam update
  text = profile_step.report(result, top=5)
  assert "lenet5 batch 4 (conv auto)" in text and "Conv_0" in text
  # with XLA's own convolutions: the convolution instructions found and put in their layers
  native = profile_step.profile("lenet5", 4, 2, 1, make_tiny_dataset(16, 10), conv="xla")
  assert native["conv"] == "xla"
  assert {op["layer"] for op in native["ops"] if op["opcode"] == "convolution"} == {"Conv_0", "Conv_1"}
  own_ms = {op["op"]: op["ms"] for op in native["ops"]}
  for op in native["async_ops"]:  # which ones is up to the thread pool; each finished late
    assert op["latency_ms"] > profile_step.ASYNC_LATENCY_RATIO * own_ms[op["op"]]


def test_bad_arguments_fail_before_compiling():
  with pytest.raises(SystemExit):
    profile_step.main(["--model", "lenet5", "--steps", "0"])
  with pytest.raises(SystemExit):
    profile_step.main(["--model", "no_such_net"])
  with pytest.raises(SystemExit):
    profile_step.main(["--model", "lenet5", "--conv", "fft"])
