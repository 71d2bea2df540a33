"""Session-wide tiny trained runs for the predictor and UI tests, and the runs shipped in ckpt/.

A LeNet-5 run (ReLU) is trained for two short epochs on the synthetic data of
conftest's ``tiny_dataset`` (a few seconds on CPU), so tests exercise the real
export written by ``train.fit`` rather than files that must already exist.
Import the fixtures into a test module to use them::

    from tests.fixtures_runs import tiny_ckpt_root, lenet_run  # noqa: F401
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TINY_NETWORK = 'lenet5'
# The exported runs that ship in ckpt/ (a fresh clone classifies with them at once).
SHIPPED_RUNS = sorted(p.parent.parent for p in
                      (Path(__file__).resolve().parents[1] / 'ckpt').glob('*/inference/meta.json'))
# A child pytest process (see test_ui.py) reuses its parent's tiny run instead of training again.
REUSE_CKPT_ROOT_ENV = 'CIFAR_FLAX_TEST_CKPT_ROOT'


def train_tiny_run(ckpt_root: Path, dataset, network: str = TINY_NETWORK) -> Path:
    """Train ``network`` briefly into ``ckpt_root/<network>-seed-tiny``; returns the run folder."""
    from cifar_flax import config as config_lib
    from cifar_flax import train

    run_dir = Path(ckpt_root) / f'{network}-seed-tiny'
    config = config_lib.make_config(network, 'seed', epochs=2, batch_size=32, learning_rate=3e-3,
                                    activation='relu',  # sigmoid learns too slowly for 16 steps
                                    workdir=str(run_dir), tag='tiny', quiet=True, eval_batch_size=50)
    train.fit(config, fresh=True, dataset=dataset)
    return run_dir


@pytest.fixture(scope='session')
def tiny_ckpt_root(tmp_path_factory, tiny_dataset) -> Path:
    """A ckpt root holding one trained LeNet-5 run (and nothing for the other networks)."""
    if os.environ.get(REUSE_CKPT_ROOT_ENV):
        return Path(os.environ[REUSE_CKPT_ROOT_ENV])
    root = tmp_path_factory.mktemp('ckpt')
    train_tiny_run(root, tiny_dataset)
    return root


@pytest.fixture(scope='session')
def lenet_run(tiny_ckpt_root) -> Path:
    return tiny_ckpt_root / f'{TINY_NETWORK}-seed-tiny'
