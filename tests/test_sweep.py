"""Sweeps on tiny synthetic data: vmapped members equal separate runs, resume
and skip, divergence, run sharing, outputs, planning and the command line."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar_flax import sweep, train
from cifar_flax.config import Config
from experiments import sweeps as sweeps_cli

REPO = Path(__file__).resolve().parents[1]
TIMING_FIELDS = {"seconds", "test_seconds", "train_images_per_second", "members_in_program", "member_mode"}


def tiny_base(**overrides):
  values = dict(network="lenet5", epochs=2, batch_size=32, activation="relu", eval_batch_size=50,
                steps_per_call=3, quiet=True)
  values.update(overrides)
  return Config(**values)


def members_of(configs):
  """Members from explicit configs (not a product), labelled by their index."""
  return tuple(sweep.Member((("member", i),), c) for i, c in enumerate(configs))


def timeless(history):
  return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in history["epochs"]]


def assert_histories_close(a, b):
  """Losses within float tolerance; accuracies within a couple of images (a
  vmapped convolution sums in another order, which can flip a borderline one)."""
  a, b = timeless(a), timeless(b)
  assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
  for ra, rb in zip(a, b):
    assert ra.keys() == rb.keys()
    for key in ra:
      if key.endswith("accuracy"):
        np.testing.assert_allclose(ra[key], rb[key], atol=0.021, err_msg=key)
      else:
        np.testing.assert_allclose(ra[key], rb[key], rtol=1e-3, err_msg=key)


@pytest.fixture
def count_groups(monkeypatch):
  """Records the run ids of every group that `run_sweep` trains."""
  trained = []
  real = sweep.train_group

  def spy(group, *args, **kwargs):
    trained.append(tuple(run.id for run in group.runs))
    return real(group, *args, **kwargs)
  monkeypatch.setattr(sweep, "train_group", spy)
  return trained


def test_vmapped_members_match_separate_fits_and_outputs(tmp_path, tiny_dataset, count_groups):
  # Every vmapped field differs between members: learning rate, momentum, weight decay, seed.
  configs = [tiny_base(optimizer="sgd", learning_rate=0.05, momentum=0.9, seed=0),
             tiny_base(optimizer="sgd", learning_rate=0.1, momentum=0.5, weight_decay=5e-4, seed=1),
             tiny_base(optimizer="sgd", learning_rate=0.02, weight_decay=1e-3, seed=2)]
  study = sweep.Study("mixed", ("member",), members_of(configs), tmp_path / "sweep",
                      command="pytest")
  results = sweep.run_sweep(study, tiny_dataset, quiet=True, mode="vmap")
  assert len(count_groups) == 1 and len(count_groups[0]) == 3  # one program for all three
  looped = sweep.run_sweep(dataclasses.replace(study, workdir=tmp_path / "looped"),
                           tiny_dataset, quiet=True, mode="loop")
  for config, entry, looped_entry in zip(configs, results["members"], looped["members"]):
    single = train.fit(config.replace(workdir=str(tmp_path / f"fit{entry['label']}")),
                       dataset=tiny_dataset)
    assert entry["history"]["status"] == single["status"] == "finished"
    assert set(entry["history"]["epochs"][0]) >= set(single["epochs"][0])
    assert entry["history"]["epochs"][0]["member_mode"] == "vmap"
    assert_histories_close(entry["history"], single)
    # Looped members run the trainer's own program: the same numbers exactly.
    assert timeless(looped_entry["history"]) == timeless(single)

  workdir = tmp_path / "sweep"
  table = (workdir / "table.md").read_text()
  assert "`pytest`" in table and table.count("\n| ") == 4  # header + 3 members
  saved = json.loads((workdir / "results.json").read_text())
  assert [len(m["history"]["epochs"]) for m in saved["members"]] == [2, 2, 2]
  with Image.open(workdir / "figure.png") as image:
    image.verify()
  # Run again: nothing is retrained, the results are the same.
  again = sweep.run_sweep(study, tiny_dataset, quiet=True)
  assert len(count_groups) == 2
  assert again["members"] == results["members"]


def test_interrupted_sweep_resumes_and_skips_finished_groups(tmp_path, tiny_dataset,
                                                             monkeypatch):
  base = tiny_base(epochs=3)
  grid = {"optimizer": ["sgd", "adam"], "learning_rate": [1e-2, 3e-3]}
  study = sweep.Study("resume", tuple(grid), sweep.grid_members(base, grid), tmp_path / "a")
  groups = sweep.plan_groups(sweep.plan_runs(study.members).values())
  assert [len(g.runs) for g in groups] == [2, 2]  # optimizers loop, learning rates vmap

  trained, interrupt = [], {"at": 2}
  real = sweep.train_group

  def spy(group, *args, **kwargs):
    trained.append(group.id)
    if len(trained) == interrupt["at"]:
      raise KeyboardInterrupt  # as Ctrl-C when the second group starts
    return real(group, *args, **kwargs)
  monkeypatch.setattr(sweep, "train_group", spy)

  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(study, tiny_dataset, quiet=True, mode="vmap")
  assert trained == [groups[0].id, groups[1].id]
  interrupt["at"] = None
  # Re-run, stopped inside the second group after its first epoch.
  partial = sweep.run_sweep(study, tiny_dataset, quiet=True, stop_after_epoch=1, mode="vmap")
  assert trained[2:] == [groups[1].id]  # the finished group was skipped
  assert [len(m["history"]["epochs"]) for m in partial["members"]] == [3, 3, 1, 1]
  # Re-run: the second group resumes at epoch 2.
  final = sweep.run_sweep(study, tiny_dataset, quiet=True, mode="vmap")
  assert trained[3:] == [groups[1].id]
  assert all(m["history"]["status"] == "finished" for m in final["members"])

  # The resumed group equals an uninterrupted one, bit for bit on the CPU.
  straight = sweep.run_sweep(
      sweep.Study("straight", tuple(grid), study.members[2:], tmp_path / "b"),
      tiny_dataset, quiet=True, mode="vmap")
  for resumed, uninterrupted in zip(final["members"][2:], straight["members"]):
    assert timeless(resumed["history"]) == timeless(uninterrupted["history"])


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_diverging_member_is_reported_and_the_others_go_on(tmp_path, tiny_dataset, mode):
  grid = {"learning_rate": [1e30, 1e-2]}
  study = sweep.Study("diverge", tuple(grid),
                      sweep.grid_members(tiny_base(epochs=3, optimizer="sgd"), grid),
                      tmp_path / "sweep")
  results = sweep.run_sweep(study, tiny_dataset, quiet=True, mode=mode)
  diverged, healthy = (m["history"] for m in results["members"])
  assert diverged["status"] == "diverged"
  assert len(diverged["epochs"]) == 1 and diverged["epochs"][0]["diverged"]
  assert healthy["status"] == "finished" and len(healthy["epochs"]) == 3
  assert all(np.isfinite(r["train_loss"]) for r in healthy["epochs"])
  table = (tmp_path / "sweep" / "table.md").read_text()
  assert "**diverged** in epoch 1" in table


def test_shorter_runs_and_other_studies_reuse_finished_runs(tmp_path, tiny_dataset,
                                                            count_groups):
  base = tiny_base(epochs=2)
  epochs_study = sweep.Study("epochs", ("epochs",),
                             sweep.grid_members(base, {"epochs": [1, 3, 2]}), tmp_path / "epochs")
  results = sweep.run_sweep(epochs_study, tiny_dataset, quiet=True)
  assert len(count_groups) == 1 and len(count_groups[0]) == 1  # one 3-epoch run
  one, three, two = (m["history"] for m in results["members"])
  assert [len(h["epochs"]) for h in (one, three, two)] == [1, 3, 2]
  assert two["epochs"] == three["epochs"][:2] and two["status"] == "finished"
  assert "longest run's history" in (tmp_path / "epochs" / "table.md").read_text()

  # A learning-rate study beside it: its base member (lr 1e-3, 2 epochs) is
  # the epochs study's run, so only the other member trains.
  lr_study = sweep.Study("lr", ("learning_rate",),
                         sweep.grid_members(base, {"learning_rate": [1e-3, 3e-3]}),
                         tmp_path / "lr", reuse_dirs=(tmp_path / "epochs",))
  lr_results = sweep.run_sweep(lr_study, tiny_dataset, quiet=True)
  assert len(count_groups) == 2 and len(count_groups[1]) == 1
  assert lr_results["members"][0]["history"]["epochs"] == three["epochs"][:2]
  assert "run shared with epochs" in (tmp_path / "lr" / "table.md").read_text()

  # A longer epochs study continues the 3-epoch group from its checkpoint: its
  # first three epochs are the shorter run's records, timings included.
  longer = sweep.Study("longer", ("epochs",), sweep.grid_members(base, {"epochs": [4]}),
                       tmp_path / "longer", reuse_dirs=(tmp_path / "epochs",))
  (four,) = (m["history"] for m in sweep.run_sweep(longer, tiny_dataset, quiet=True)["members"])
  assert len(count_groups) == 3
  assert four["status"] == "finished" and four["epochs"][:3] == three["epochs"]
  assert len(four["epochs"]) == 4


def test_study_plans():
  def plan(name, **overrides):
    study = sweep.make_study(name, Path("/nonexistent/sweeps") / name, **overrides)
    runs = sweep.plan_runs(study.members)
    return study, runs, sweep.plan_groups(runs.values())

  study, runs, groups = plan("learning_rate")
  assert len(study.members) == 5 and [len(g.runs) for g in groups] == [5]
  base = study.members[2].config
  assert (base.network, base.optimizer, base.batch_size, base.epochs, base.bn) == (
      "inception10", "adam", 32, 10, "frozen")
  for name in ("optimizer", "batch_size"):
    assert [len(g.runs) for g in plan(name)[2]] == [1] * 5
  for name in ("loss", "activation"):
    assert [len(g.runs) for g in plan(name)[2]] == [1] * 3
  study, runs, groups = plan("epochs")
  assert len(study.members) == 4 and len(runs) == 1
  assert next(iter(runs.values())).config.epochs == 50
  study, runs, _ = plan("epochs", epochs=1)  # a reduced budget caps the grid
  assert [m.config.epochs for m in study.members] == [1] and len(runs) == 1
  assert Path("/nonexistent/sweeps/optimizer") in plan("loss")[0].reuse_dirs
  # The base configuration is one run in every study ('relu' is inception10's default).
  base_runs = {sweep.run_id(m.config) for name, value in [
      ("learning_rate", 1e-3), ("optimizer", "adam"), ("loss", "cross_entropy"),
      ("activation", "relu"), ("batch_size", 32), ("epochs", 10)]
      for m in plan(name)[0].members if m.values[0][1] == value}
  assert len(base_runs) == 1


def test_grid_parsing_and_errors():
  assert sweep.parse_grid(["lr=1e-3,3e-3", "wd=0,5e-4", "seed=0,1,2", "augment=true,false"]) == {
      "learning_rate": [1e-3, 3e-3], "weight_decay": [0.0, 5e-4], "seed": [0, 1, 2],
      "augment": [True, False]}
  members = sweep.grid_members(tiny_base(), sweep.parse_grid(["lr=1e-3,3e-3", "seed=0,1"]))
  assert [m.label for m in members] == [
      "learning_rate=0.001, seed=0", "learning_rate=0.001, seed=1",
      "learning_rate=0.003, seed=0", "learning_rate=0.003, seed=1"]
  for specs, message in [(["foo=1"], "valid fields and aliases"), (["lr=x"], "expects float"),
                         (["lr"], "FIELD=V1,V2"), (["seed=1.5"], "expects int"),
                         (["lr=1,1"], "repeated"), (["lr=1", "learning_rate=2"], "twice"),
                         (["data=a,b"], "cannot grid")]:
    with pytest.raises(ValueError, match=message):
      sweep.parse_grid(specs)
  with pytest.raises(ValueError, match="valid: sgd"):
    sweep.grid_members(tiny_base(), {"optimizer": ["adamax"]})
  with pytest.raises(ValueError, match="unknown study"):
    sweep.make_study("dropout")


def test_command_line(tmp_path, tiny_dataset, monkeypatch, capsys):
  monkeypatch.setattr(sweep.data_lib, "load_cifar10", lambda source=None: tiny_dataset)
  workdir = tmp_path / "grid"
  code = sweeps_cli.main(["--model", "lenet5", "--grid", "lr=1e-3,3e-3", "--epochs", "1",
                          "--eval-batch-size", "50", "--workdir", str(workdir), "--quiet"])
  assert code == 0
  assert "--grid lr=1e-3,3e-3" in (workdir / "table.md").read_text()
  assert len(json.loads((workdir / "results.json").read_text())["members"]) == 2
  assert sweeps_cli.main(["learning_rate", "--model", "lenet5"]) == 2
  assert sweeps_cli.main(["--grid", "lr=1e-3"]) == 2
  assert "give a study name" in capsys.readouterr().err

  args = sweeps_cli.build_parser().parse_args(["all", "--epochs", "1", "--train-subset", "2000",
                                               "--workdir", str(tmp_path / "studies")])
  studies = sweeps_cli.make_studies(args, "cmd")
  assert [s.name for s in studies] == list(sweep.STUDIES)
  assert all(s.workdir == tmp_path / "studies" / s.name for s in studies)
  assert all(m.config.train_subset == 2000 and m.config.epochs == 1
             for s in studies for m in s.members)


MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import jax
    from conftest import make_tiny_dataset
    from cifar_flax import sweep
    from cifar_flax.config import Config
    base = Config(network="lenet5", epochs=2, batch_size=32, eval_batch_size=50, quiet=True,
                  steps_per_call=4, activation="relu")
    grid = {{"learning_rate": [1e-3, 3e-3], "seed": [0, 1]}}
    study = sweep.Study("md", tuple(grid), sweep.grid_members(base, grid), Path({workdir!r}))
    mesh = sweep.member_mesh(4)
    results = sweep.run_sweep(study, make_tiny_dataset(), quiet=True, mode="vmap")
    print(json.dumps(dict(devices=jax.device_count(), mesh=None if mesh is None else mesh.size,
                          losses=[[r["train_loss"] for r in m["history"]["epochs"]]
                                  for m in results["members"]],
                          test=[[r["test_loss"] for r in m["history"]["epochs"]]
                                for m in results["members"]])))
""")


def test_members_shard_over_devices(tmp_path):
  results = {}
  for count in (1, 4):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}")
    script = MULTI_DEVICE_SCRIPT.format(tests=str(Path(__file__).parent),
                                        workdir=str(tmp_path / f"sweep{count}"))
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    results[count] = json.loads(out.strip().splitlines()[-1])
  assert results[4]["devices"] == 4 and results[4]["mesh"] == 4 and results[1]["mesh"] is None
  np.testing.assert_allclose(results[4]["losses"], results[1]["losses"], rtol=1e-4)
  np.testing.assert_allclose(results[4]["test"], results[1]["test"], rtol=1e-4)
