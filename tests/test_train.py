"""The trainer on tiny synthetic data: learning, exact resume, crash safety,
bad configurations, divergence, outputs, and data parallelism."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cifar_flax import checkpoint, train, xla_options
from cifar_flax.config import Config, make_config
from cifar_flax.models import get_model

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path, **overrides):
  values = dict(network="lenet5", epochs=2, batch_size=32, activation="relu", eval_batch_size=50,
                steps_per_call=3, quiet=True, workdir=str(tmp_path / "run"))
  values.update(overrides)
  return Config(**values)


def timeless(history):
  """A history without wall-clock fields, for comparing runs."""
  drop = {"seconds", "test_seconds", "train_images_per_second"}
  return [{k: v for k, v in r.items() if k not in drop} for r in history["epochs"]]


def test_overfits_256_images(tmp_path, tiny_dataset):
  config = tiny_config(tmp_path, epochs=15, learning_rate=3e-3)
  history = train.fit(config, dataset=tiny_dataset)
  assert history["status"] == "finished"
  assert history["epochs"][-1]["train_accuracy"] >= 0.99
  assert history["epochs"][-1]["test_accuracy"] >= 0.9  # the classes are learnable


def test_resume_is_bitwise_identical(tmp_path, tiny_dataset):
  # Augmentation on, so data order and crop/flip keys must come from (seed, epoch, step).
  straight = tiny_config(tmp_path, epochs=3, augment=True, workdir=str(tmp_path / "straight"))
  interrupted = straight.replace(workdir=str(tmp_path / "interrupted"))
  history_a = train.fit(straight, dataset=tiny_dataset)
  partial = train.fit(interrupted, dataset=tiny_dataset, stop_after_epoch=1)
  assert len(partial["epochs"]) == 1
  history_b = train.fit(interrupted, dataset=tiny_dataset)
  assert timeless(history_a) == timeless(history_b)
  params_a = checkpoint.load_inference(straight.run_dir()).variables
  params_b = checkpoint.load_inference(interrupted.run_dir()).variables
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  saved = json.loads((interrupted.run_dir() / "history.json").read_text())
  assert [r["epoch"] for r in saved["epochs"]] == [1, 2, 3]


def test_dropout_and_batchnorm_network_resumes_exactly(tmp_path, tiny_dataset):
  # inception10 has BatchNorm; frozen mode must keep its statistics at (0, 1).
  config = tiny_config(tmp_path, network="inception10", bn="frozen", epochs=1, steps_per_call=8)
  train.fit(config, dataset=tiny_dataset)
  stats = checkpoint.load_inference(config.run_dir()).variables["batch_stats"]
  means = [np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(stats)
           if "mean" in jax.tree_util.keystr(path)]
  assert means and all(np.all(m == 0) for m in means)


KILL_SCRIPT = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {tests!r})
    from conftest import make_tiny_dataset
    from cifar_flax import checkpoint, train
    from cifar_flax.config import Config
    real_save = checkpoint.save_checkpoint
    def stalling_save(manager, step, *args, **kwargs):
        if step == 2:
            # Stall every rename, so orbax's tmp folder is never committed.
            def stall(*a, **k):
                print("STALLED", flush=True)
                time.sleep(600)
            os.rename = os.replace = stall
        return real_save(manager, step, *args, **kwargs)
    checkpoint.save_checkpoint = stalling_save
    config = Config(network="lenet5", epochs=3, batch_size=32, eval_batch_size=50,
                    quiet=True, workdir={workdir!r})
    train.fit(config, dataset=make_tiny_dataset())
""")


def test_sigkill_during_save_then_resume(tmp_path, tiny_dataset):
  workdir = tmp_path / "run"
  script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), workdir=str(workdir))
  child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                           cwd=REPO)
  try:
    lines = iter(child.stdout.readline, "")
    assert any("STALLED" in line for line in lines), "the child never reached the stalled save"
  finally:
    child.send_signal(signal.SIGKILL)
    child.wait()
  leftovers = list((workdir / "checkpoints").glob("*orbax-checkpoint-tmp*"))
  assert leftovers, "the kill should have left an unfinished orbax folder"
  config = Config(network="lenet5", epochs=3, batch_size=32, eval_batch_size=50, quiet=True,
                  workdir=str(workdir))
  history = train.fit(config, dataset=tiny_dataset)
  assert [r["epoch"] for r in history["epochs"]] == [1, 2, 3]
  assert history["status"] == "finished"


@pytest.mark.parametrize("overrides, message", [
    (dict(network="lenet6"), "valid: lenet5"),
    (dict(optimizer="adamax"), "valid: sgd"),
    (dict(schedule="step"), "valid: constant"),
    (dict(loss="hinge"), "valid: cross_entropy"),
    (dict(activation="swish2"), "valid: relu"),
    (dict(learning_rate=0.0), "learning_rate must be positive"),
    (dict(batch_size=-4), "batch_size must be positive"),
    (dict(epochs=0), "epochs must be positive"),
    (dict(batch_size=1024), "larger than the training set"),
    (dict(dropout=0.1), "lenet5 has no Dropout layers"),
    (dict(network="alexnet8", dropout=1.0), "dropout must be below 1"),
    (dict(matmul_precision="half"), "valid: default"),
])
def test_bad_configurations_fail_before_work(tmp_path, tiny_dataset, overrides, message):
  with pytest.raises(ValueError, match=message):
    train.fit(tiny_config(tmp_path, **overrides), dataset=tiny_dataset)
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_resuming_with_another_configuration_is_an_error(tmp_path, tiny_dataset):
  config = tiny_config(tmp_path, epochs=1)
  train.fit(config, dataset=tiny_dataset)
  with pytest.raises(ValueError, match="learning_rate"):
    train.fit(config.replace(learning_rate=0.5), dataset=tiny_dataset)
  with pytest.raises(ValueError, match="network"):
    train.fit(config.replace(network="inception10"), dataset=tiny_dataset)
  # --fresh starts over instead.
  history = train.fit(config.replace(learning_rate=0.5), dataset=tiny_dataset, fresh=True)
  assert len(history["epochs"]) == 1


def test_divergence_is_recorded_and_stops(tmp_path, tiny_dataset):
  config = tiny_config(tmp_path, epochs=3, optimizer="sgd", learning_rate=1e30)
  history = train.fit(config, dataset=tiny_dataset)
  assert history["status"] == "diverged"
  assert len(history["epochs"]) == 1 and history["epochs"][0]["diverged"]
  saved = json.loads((config.run_dir() / "history.json").read_text())
  assert saved["status"] == "diverged"


def test_outputs_curves_png_config_and_history(tmp_path, tiny_dataset):
  config = tiny_config(tmp_path, epochs=2)
  train.fit(config, dataset=tiny_dataset)
  run_dir = config.run_dir()
  png = run_dir / "curves.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with Image.open(png) as image:
    image.verify()
  assert json.loads((run_dir / "config.json").read_text())["network"] == "lenet5"
  records = json.loads((run_dir / "history.json").read_text())["epochs"]
  assert set(records[0]) >= {"epoch", "train_loss", "train_accuracy", "test_loss",
                             "test_accuracy", "seconds", "test_seconds", "train_images_per_second"}


def test_machine_description_names_the_cpu_and_its_vector_unit(monkeypatch):
  monkeypatch.setattr(train.platform, "machine", lambda: "x86_64")
  cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 avx512f avx512dq\n"
  assert train.describe_cpu(cpuinfo) == "x86_64, AMD EPYC, AVX-512"
  assert train.describe_cpu("model name : Some CPU\nflags : sse2 avx2\n") == "x86_64, Some CPU, AVX2"
  assert train.describe_cpu("") == "x86_64"
  assert train.describe_machine().startswith("CPU only, ")


def test_epoch_seconds_include_the_asynchronous_evaluation(tmp_path, tiny_dataset, monkeypatch):
  """The jitted evaluation returns before it has run; an epoch's recorded time
  must still contain it. Its results are made to wait for ~0.5 s of matmuls."""
  matrix = jnp.full((2048, 2048), 1.0 / 2048)
  matmuls = jax.jit(lambda a: jax.lax.fori_loop(0, 5, lambda _, x: x @ a, a)[0, 0])
  matmuls(matrix).block_until_ready()
  start = time.perf_counter()
  matmuls(matrix).block_until_ready()
  matmul_seconds = time.perf_counter() - start
  delayed = jax.jit(lambda totals, a: (totals[0] + 0 * matmuls(a), totals[1]))

  original_init = train.Trainer.__init__
  def init_with_slow_evaluation(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    evaluate = self.evaluate
    self.evaluate = lambda *arrays: delayed(evaluate(*arrays), matrix)
  monkeypatch.setattr(train.Trainer, "__init__", init_with_slow_evaluation)

  history = train.fit(tiny_config(tmp_path, epochs=2), dataset=tiny_dataset)
  second = history["epochs"][1]  # the first epoch also compiles
  assert second["test_seconds"] > 0.5 * matmul_seconds
  assert second["seconds"] >= second["test_seconds"]


def test_evaluation_counts_every_test_image(tmp_path, tiny_dataset):
  # 100 test images with eval batches of 64: the last batch is padded and masked.
  config = tiny_config(tmp_path, eval_batch_size=64, epochs=1)
  trainer = train.Trainer(config, tiny_dataset)
  state = trainer.init_state()
  variables = train.model_variables(state)
  loss_sum, correct = trainer.evaluate(variables, trainer.test_images, trainer.test_labels)
  logits = trainer.model.apply(variables, tiny_dataset.test_images / 255.0, train=False)
  expected = np.sum(np.argmax(logits, -1) == tiny_dataset.test_labels)
  assert int(correct) == expected
  losses = train.compute_loss(logits, tiny_dataset.test_labels, "cross_entropy")
  np.testing.assert_allclose(float(loss_sum), float(losses.sum()), rtol=1e-4)


def copies(compiled) -> int:
  return compiled.as_text().count(" copy(")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the option is XLA:CPU's")
def test_training_chunk_compiles_with_the_projects_xla_options(tmp_path, tiny_dataset):
  # Region analysis removes the copies of the scan's carried state and of the fusion
  # barriers' outputs; the same arithmetic, so the same chunk result to the last bit.
  config = tiny_config(tmp_path, epochs=1)
  trainer = train.Trainer(config, tiny_dataset)
  indices = trainer.epoch_indices(0, 0)[:3]
  args = (trainer.train_images, trainer.train_labels, indices)
  state = trainer.init_state()
  tuned = trainer.train_chunk.lower(state, *args).compile()
  plain = jax.jit(train.make_train_chunk(trainer.model, trainer.tx, config)).lower(
      state, *args).compile()
  assert copies(tuned) < copies(plain)
  tuned_state, tuned_sums = tuned(state, *args)
  plain_state, plain_sums = plain(trainer.init_state(), *args)
  assert float(tuned_sums["loss_sum"]) == float(plain_sums["loss_sum"])
  jax.tree.map(np.testing.assert_array_equal, tuned_state.params, plain_state.params)


def test_xla_options_are_options_xla_knows():
  # XLA's debug options are one set for every backend, so the GPU's compile here too; a
  # misspelt or retired name is rejected at compile time, the first GPU run would fail.
  for backend, options in xla_options.BACKEND_COMPILER_OPTIONS.items():
    assert xla_options.compiler_options(backend) == options
    assert float(jax.jit(lambda x: x.sum(), compiler_options=options)(jnp.ones(3))) == 3.0
  with pytest.raises(Exception, match="xla_gpu_no_such_option"):
    jax.jit(lambda x: x.sum(), compiler_options={"xla_gpu_no_such_option": True})(jnp.ones(3))
  assert xla_options.compiler_options("tpu") is None


def test_losses_match_their_definitions():
  logits = jnp.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
  labels = jnp.array([0, 2])
  probs = np.asarray(jax.nn.softmax(logits))
  onehot = np.eye(3)[[0, 2]]
  np.testing.assert_allclose(train.compute_loss(logits, labels, "cross_entropy"),
                             -np.log(probs[[0, 1], [0, 2]]), rtol=1e-5)
  np.testing.assert_allclose(train.compute_loss(logits, labels, "mse"),
                             ((probs - onehot) ** 2).mean(-1), rtol=1e-5)
  bce = -(onehot * np.log(probs) + (1 - onehot) * np.log(1 - probs)).mean(-1)
  np.testing.assert_allclose(train.compute_loss(logits, labels, "bce"), bce, rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop", "adagrad", "adadelta", "adam", "adamw"])
@pytest.mark.parametrize("schedule", ["constant", "onecycle"])
def test_every_optimizer_and_schedule_steps(optimizer, schedule):
  config = Config(optimizer=optimizer, schedule=schedule, weight_decay=1e-4, momentum=0.9,
                  grad_clip=1.0, label_smoothing=0.1)
  tx = train.make_optimizer(config, steps_per_epoch=10)
  params = {"kernel": jnp.ones((3, 3)), "bias": jnp.ones((3,))}
  updates, _ = tx.update({"kernel": jnp.ones((3, 3)), "bias": jnp.ones((3,))}, tx.init(params),
                         params)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
  assert float(jnp.abs(updates["kernel"]).sum()) > 0


def test_recipe_protocol_differs_from_seed():
  seed = make_config("resnet18", "seed")
  recipe = make_config("resnet18", "recipe", {"learning_rate": 0.2})
  assert (seed.optimizer, seed.batch_size, seed.augment) == ("adam", 32, False)
  assert recipe.augment and recipe.tta_flip and recipe.learning_rate == 0.2
  assert make_config("googlenet", "seed").bn == "frozen"


def test_dropout_option_sets_the_networks_rate():
  default = get_model("vgg16", **make_config("vgg16", "recipe").model_options())
  lowered = get_model("vgg16", **make_config("vgg16", "recipe", dropout=0.05).model_options())
  assert (default.dropout, lowered.dropout) == (0.2, 0.05)


MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import jax
    from conftest import make_tiny_dataset
    from cifar_flax import train
    from cifar_flax.config import Config
    config = Config(network="lenet5", epochs=2, batch_size=32, eval_batch_size=50, quiet=True,
                    steps_per_call=4, workdir={workdir!r})
    history = train.fit(config, dataset=make_tiny_dataset())
    print(json.dumps(dict(devices=jax.device_count(),
                          losses=[r["train_loss"] for r in history["epochs"]],
                          test=[r["test_loss"] for r in history["epochs"]])))
""")


def test_data_parallel_matches_one_device(tmp_path):
  results = {}
  for count in (1, 4):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}")
    script = MULTI_DEVICE_SCRIPT.format(tests=str(Path(__file__).parent),
                                        workdir=str(tmp_path / f"run{count}"))
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    results[count] = json.loads(out.strip().splitlines()[-1])
  assert results[4]["devices"] == 4 and results[1]["devices"] == 1
  np.testing.assert_allclose(results[4]["losses"], results[1]["losses"], rtol=1e-4)
  np.testing.assert_allclose(results[4]["test"], results[1]["test"], rtol=1e-4)
