"""Desktop app under a private Xvfb: callbacks, a real click, screenshots, errors.

Dear PyGui allows one context per process, so one session-wide App is shared by
all tests here; the command line is tested in subprocesses.

TensorFlow (imported by the tfds tests) exports its own copy of LLVM's symbols,
and Mesa's software OpenGL (llvmpipe, what Xvfb renders with) then calls into
it and segfaults. So when TensorFlow is already loaded in this pytest process,
`test_ui_in_clean_process` runs this file again in a fresh process and the
in-process tests skip; run alone, the tests run here directly.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar_flax.data import CLASS_NAMES
from tests.fixtures_runs import REUSE_CKPT_ROOT_ENV, lenet_run, tiny_ckpt_root  # noqa: F401  (session fixtures)

REPO_ROOT = Path(__file__).resolve().parents[1]
CLEAN_PROCESS_REASON = ('TensorFlow is loaded in this process (its LLVM symbols crash Mesa\'s llvmpipe) or '
                        'this is a pytest-xdist worker: these tests ran in a clean process, see '
                        'test_ui_in_clean_process')


def tensorflow_loaded() -> bool:
    return 'tensorflow' in sys.modules


def ui_runs_here() -> bool:
    """Whether the Dear PyGui tests run in this process. Not with TensorFlow loaded, and not in
    an xdist worker: another test there may load TensorFlow, and xdist may give this file's tests
    to both workers (xdist_group marks were not honoured with pytest 9.2 and xdist 3.8), so their order and
    shared app state would be lost. Elsewhere test_ui_in_clean_process runs them in a child."""
    return not tensorflow_loaded() and 'PYTEST_XDIST_WORKER' not in os.environ


def _die_with_parent(command: list[str]) -> list[str]:
    """Make the server get SIGTERM when pytest dies, even by SIGKILL (util-linux setpriv).

    Done with setpriv rather than a preexec_fn, which would fork the multithreaded
    JAX process.
    """
    setpriv = shutil.which('setpriv')
    return [setpriv, '--pdeathsig', 'TERM', *command] if setpriv else command


@pytest.fixture(scope='session')
def x_display():
    """A private Xvfb display (never the developer's screen); stopped even if tests fail."""
    if shutil.which('Xvfb') is None:
        pytest.skip('Xvfb is not installed (apt-get install xvfb); UI tests need a display')
    read_fd, write_fd = os.pipe()
    server = subprocess.Popen(
        _die_with_parent(['Xvfb', '-displayfd', str(write_fd), '-screen', '0', '1280x1024x24', '-nolisten', 'tcp']),
        pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    try:
        with os.fdopen(read_fd) as pipe:  # Xvfb writes the display number it chose
            number = pipe.readline().strip()
        if not number:
            raise RuntimeError(f'Xvfb did not start (exit code {server.poll()})')
        previous = os.environ.get('DISPLAY')
        os.environ['DISPLAY'] = f':{number}'
        yield f':{number}'
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        if 'previous' in locals():
            if previous is None:
                os.environ.pop('DISPLAY', None)
            else:
                os.environ['DISPLAY'] = previous


def test_ui_in_clean_process(tiny_ckpt_root):
    """Run this file in a fresh pytest process (one process, no xdist) unless it runs here."""
    if ui_runs_here():
        pytest.skip('TensorFlow is not loaded and this is no xdist worker; the UI tests run here directly')
    if shutil.which('Xvfb') is None:
        pytest.skip('Xvfb is not installed (apt-get install xvfb); UI tests need a display')
    env = {name: value for name, value in os.environ.items() if not name.startswith('PYTEST_XDIST_')}
    env.update({'MPLBACKEND': 'Agg', REUSE_CKPT_ROOT_ENV: str(tiny_ckpt_root)})
    result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-rs', '-p', 'no:cacheprovider', __file__],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    print(result.stdout)
    assert result.returncode == 0, f'UI tests failed in the clean process:\n{result.stdout[-10000:]}\n{result.stderr[-3000:]}'
    summary = result.stdout.strip().splitlines()[-1]
    counts = {word: int(number) for number, word in re.findall(r'(\d+) (\w+)', summary)}
    # Only this wrapper may skip there (TensorFlow is not loaded in the child).
    assert counts.get('passed', 0) > 0 and counts.get('skipped', 0) == 1, result.stdout


@pytest.fixture(scope='session')
def app(x_display, tiny_ckpt_root):
    if not ui_runs_here():
        pytest.skip(CLEAN_PROCESS_REASON)
    import dearpygui.dearpygui as dpg  # noqa: F401  (fail here, not at collection)
    from ui.app import App

    application = App(tiny_ckpt_root)
    application.build()
    application.render(3)
    yield application
    application.close()


@pytest.fixture(scope='session')
def dpg_module(app):
    import dearpygui.dearpygui as dpg
    return dpg


def call_callback(dpg, item, app_data=None):
    """Run an item's registered callback the way Dear PyGui does (as many arguments as it takes)."""
    callback = dpg.get_item_callback(item)
    arguments = (item, app_data, dpg.get_item_user_data(item))
    callback(*arguments[:len(inspect.signature(callback).parameters)])


def label_text(app, dpg) -> str:
    return dpg.get_value(app.tags['label'])


def sample(name: str) -> Path:
    from ui.app import SAMPLES_DIR
    return SAMPLES_DIR / f'{name}.jpg'


def test_samples_ship_with_the_app():
    from ui.app import sample_images
    samples = sample_images()
    assert sorted(samples) == sorted(CLASS_NAMES)
    for path in samples.values():
        assert Image.open(path).size == (32, 32)


def test_networks_without_params_are_disabled_with_a_hint(app, dpg_module):
    dpg = dpg_module
    assert dpg.get_item_configuration(app.tags['networks']['lenet5'])['enabled']
    for network, module in [('alexnet8', 'alexnet8'), ('vgg16', 'vgg16'), ('inception10', 'googlenet'),
                            ('resnet18', 'resnet18')]:
        assert not dpg.get_item_configuration(app.tags['networks'][network])['enabled']
        assert f'python -m experiments.{module}' in dpg.get_value(app.tags['hints'][network])
    assert not dpg.is_item_shown(app.tags['no_params'])
    # Choosing one anyway explains how to train it; nothing is selected.
    assert not app.select_network('vgg16')
    assert 'python -m experiments.vgg16' in app.last_error
    assert app.network != 'vgg16'


def test_predict_through_the_callbacks(app, dpg_module, lenet_run):
    dpg = dpg_module
    call_callback(dpg, app.tags['samples'], 'cat')  # pick a sample from the combo
    assert app.image_path == sample('cat')
    call_callback(dpg, app.tags['networks']['lenet5'], True)
    app.wait()
    assert 'lenet5-seed-tiny' in dpg.get_value(app.tags['params'])
    assert 'epoch 2' in dpg.get_value(app.tags['params'])
    assert app.predictors['lenet5'].source.run_dir == lenet_run
    assert label_text(app, dpg) == 'Prediction: -' and sum(app.bar_values()) == 0

    call_callback(dpg, app.tags['predict'])
    app.wait()
    expected = app.predictors['lenet5'].predict(sample('cat'))[0]
    best = CLASS_NAMES[int(expected.argmax())]
    assert label_text(app, dpg).startswith(f'Prediction: {best} (')
    np.testing.assert_allclose(app.bar_values(), expected, atol=1e-6)
    assert 'prediction took' in dpg.get_value(app.tags['timing'])
    assert app.last_error is None

    # The loaded network is kept: choosing it again starts no new load.
    predictor = app.predictors['lenet5']
    call_callback(dpg, app.tags['networks']['lenet5'], True)
    app.wait()
    assert app.predictors['lenet5'] is predictor


def test_real_click_on_predict(app, dpg_module, x_display):
    dpg = dpg_module
    if shutil.which('xdotool') is None:
        pytest.skip('xdotool is not installed')
    app.select_network('lenet5')
    app.open_image(sample('ship'))
    app.wait()
    assert label_text(app, dpg) == 'Prediction: -'
    env = {**os.environ, 'DISPLAY': x_display}

    def xdotool(*args):
        return subprocess.run(['xdotool', *args], env=env, capture_output=True, text=True, timeout=10)

    windows = xdotool('search', '--name', 'cifar-flax classifier').stdout.split()
    assert windows, 'the app window was not found by xdotool'
    x, y = dpg.get_item_rect_min(app.tags['predict'])
    width, height = dpg.get_item_rect_size(app.tags['predict'])
    xdotool('mousemove', '--window', windows[0], str(int(x + width / 2)), str(int(y + height / 2)))
    app.render(5)
    assert dpg.is_item_hovered(app.tags['predict'])
    xdotool('click', '1')
    deadline = time.monotonic() + 60
    while label_text(app, dpg) == 'Prediction: -' and time.monotonic() < deadline:
        app.render()
        time.sleep(0.01)
    app.wait()
    expected = app.predictors['lenet5'].predict(sample('ship'))[0]
    assert label_text(app, dpg).startswith(f'Prediction: {CLASS_NAMES[int(expected.argmax())]} (')
    np.testing.assert_allclose(app.bar_values(), expected, atol=1e-6)


def test_screenshot_is_not_blank(app, dpg_module, tmp_path):
    dpg = dpg_module
    app.open_image(sample('horse'))
    app.predict()
    app.wait()
    path = tmp_path / 'window.png'
    dpg.output_frame_buffer(file=str(path))
    deadline = time.monotonic() + 20
    while not path.exists() and time.monotonic() < deadline:
        app.render()
    app.render(2)
    shot = np.asarray(Image.open(path).convert('RGB'))
    assert shot.shape[0] > 500 and shot.shape[1] > 900
    colours = np.unique(shot.reshape(-1, 3), axis=0)
    assert len(colours) > 100, f'screenshot looks blank ({len(colours)} colours)'


def test_bad_files_show_an_error_and_the_app_keeps_running(app, dpg_module, tmp_path):
    dpg = dpg_module
    call_callback(dpg, app.tags['open'])  # the Open button shows Dear PyGui's file dialog
    app.render(2)
    assert dpg.is_item_shown(app.tags['file_dialog'])
    dpg.hide_item(app.tags['file_dialog'])
    assert app.select_network('lenet5')
    app.open_image(sample('dog'))
    bad = tmp_path / 'broken.png'
    bad.write_text('not an image')
    # Through the file dialog's callback, as Dear PyGui calls it.
    app._on_file_dialog('file_dialog', {'file_path_name': str(bad), 'selections': {bad.name: str(bad)}})
    app.render(2)
    assert dpg.is_item_shown(app.tags['error'])
    assert 'broken.png' in dpg.get_value(app.tags['error'])
    assert app.image_path == sample('dog')  # the previous image stays
    assert not app.open_image(tmp_path / 'missing.jpg')
    assert 'missing.jpg' in dpg.get_value(app.tags['error'])
    assert not app.open_image(tmp_path)
    app.render(2)
    # Still working: a good image clears the error and predicts.
    assert app.open_image(sample('dog'))
    assert not dpg.is_item_shown(app.tags['error'])
    app.predict()
    app.wait()
    assert label_text(app, dpg).startswith('Prediction: ')
    assert label_text(app, dpg) != 'Prediction: -'


def test_failed_load_is_shown(app, dpg_module, tmp_path):
    dpg = dpg_module
    # A run folder whose export is damaged: listed, but restoring fails.
    broken = tmp_path / 'ckpt' / 'vgg16-seed-broken'
    (broken / 'inference').mkdir(parents=True)
    meta = dict(network='vgg16', model_options={}, normalization='unit', class_names=list(CLASS_NAMES),
                epoch=1, test_accuracy=0.5)  # but no variables/ folder
    (broken / 'inference' / 'meta.json').write_text(json.dumps(meta))
    saved_root = app.ckpt_root
    try:
        app.ckpt_root = broken.parent
        app.refresh_networks()
        assert dpg.get_item_configuration(app.tags['networks']['vgg16'])['enabled']
        assert app.select_network('vgg16')
        app.wait()
        assert dpg.is_item_shown(app.tags['error'])
        assert 'Could not load VGG16 params' in dpg.get_value(app.tags['error'])
        assert 'vgg16' not in app.predictors and app.network is None
        app.render(2)  # the window survives
    finally:
        app.ckpt_root = saved_root
        app.refresh_networks()
    assert not dpg.get_item_configuration(app.tags['networks']['vgg16'])['enabled']


def test_no_params_at_all_says_how_to_get_them(app, dpg_module, tmp_path):
    dpg = dpg_module
    saved_root = app.ckpt_root
    try:
        app.ckpt_root = tmp_path
        app.refresh_networks()
        app.render(2)
        assert dpg.is_item_shown(app.tags['no_params'])
        message = dpg.get_value(app.tags['no_params'])
        assert str(tmp_path) in message and 'python -m experiments.lenet5' in message
        assert not any(dpg.get_item_configuration(tag)['enabled'] for tag in app.tags['networks'].values())
        assert app.network is None
    finally:
        app.ckpt_root = saved_root
        app.refresh_networks()
    assert not dpg.is_item_shown(app.tags['no_params'])
    assert app.select_network('lenet5')


def test_command_line_opens_image_and_network(x_display, tiny_ckpt_root, tmp_path):
    """`python -m ui IMAGE --model NAME` (in its own process: one context per process)."""
    shot = tmp_path / 'cli.png'
    env = {**os.environ, 'DISPLAY': x_display, 'PYTHONPATH': str(REPO_ROOT), 'JAX_PLATFORMS': 'cpu'}
    result = subprocess.run(
        [sys.executable, '-m', 'ui', str(sample('frog')), '--model', 'lenet5', '--ckpt-root', str(tiny_ckpt_root),
         '--screenshot', str(shot)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert 'Traceback' not in result.stderr
    colours = np.unique(np.asarray(Image.open(shot).convert('RGB')).reshape(-1, 3), axis=0)
    assert len(colours) > 100
