"""Predictor: loading, preprocessing of every image mode, bad inputs, compilation count, CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image, ImageOps

from cifar_flax import images, models
from cifar_flax.data import CLASS_NAMES, normalize
from cifar_flax.predict import BATCH_BUCKETS, bucket_size, load_predictor, preprocess
from tests.fixtures_runs import SHIPPED_RUNS, lenet_run, tiny_ckpt_root  # noqa: F401  (session fixtures)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def predictor(lenet_run):
    return load_predictor(lenet_run)


def gradient_image(width=64, height=48) -> np.ndarray:
    """An asymmetric RGB test picture (rotations and flips change it)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / (width - 1), 255 * y / (height - 1), np.full_like(x, 60.0)], -1)
    rgb[: height // 3, : width // 3] = (250, 250, 0)  # a corner marker
    return rgb.astype(np.uint8)


def cifar_folder(root: Path, dataset, count=20) -> list[Path]:
    """Write test images of the tiny dataset as lossless PNGs (a CIFAR-style image folder)."""
    paths = []
    for i in range(count):
        label = CLASS_NAMES[dataset.test_labels[i]]
        path = root / label / f'{i:04d}.png'
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(dataset.test_images[i]).save(path)
        paths.append(path)
    return paths


# ---- loading ---------------------------------------------------------------------


def test_source_and_class_names(predictor, lenet_run):
    assert predictor.class_names == tuple(CLASS_NAMES)
    assert predictor.network == 'lenet5'
    assert predictor.source.run_dir == lenet_run
    assert predictor.source.epoch == 2
    assert 0.0 <= predictor.source.test_accuracy <= 1.0
    assert lenet_run.name in str(predictor.source)


def test_load_best_run_by_network_name(tiny_ckpt_root, lenet_run):
    by_name = load_predictor('lenet5', ckpt_root=tiny_ckpt_root)
    assert by_name.source.run_dir == lenet_run
    # The inference folder itself is accepted as well.
    assert load_predictor(lenet_run / 'inference').source.run_dir == lenet_run


@pytest.mark.parametrize('name, module', [('vgg16', 'vgg16'), ('googlenet', 'googlenet'),
                                          ('inception10', 'googlenet')])
def test_untrained_network_names_its_training_command(tiny_ckpt_root, name, module):
    with pytest.raises(FileNotFoundError, match=f'python -m experiments.{module}'):
        load_predictor(name, ckpt_root=tiny_ckpt_root)


def test_unknown_network_lists_valid_names(tiny_ckpt_root):
    with pytest.raises(ValueError, match='resnet18'):
        load_predictor('resnet99', ckpt_root=tiny_ckpt_root)


def test_run_folder_without_export(tmp_path):
    with pytest.raises(FileNotFoundError, match='no trained params'):
        load_predictor(tmp_path)


# ---- predictions -----------------------------------------------------------------


def test_shapes_and_probabilities(predictor, tmp_path):
    path = tmp_path / 'photo.png'
    Image.fromarray(gradient_image(200, 120)).save(path)
    batch = np.random.default_rng(0).integers(0, 256, (5, 40, 50, 3), dtype=np.uint8)
    cases = {
        'path': (str(path), 1), 'Path': (path, 1), 'PIL': (Image.open(path), 1),
        'array': (gradient_image(), 1), '4-D array': (batch, 5), 'list': ([path, batch[0], str(path)], 3),
    }
    for name, (inputs, count) in cases.items():
        probabilities = predictor.predict(inputs)
        assert probabilities.shape == (count, 10), name
        assert probabilities.dtype == np.float32, name
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5, err_msg=name)
        assert (probabilities >= 0).all(), name
    assert predictor.predict([]).shape == (0, 10)


def test_agrees_with_applying_the_model(predictor, lenet_run, tiny_dataset, tmp_path):
    """Images of a CIFAR-style folder get the model's own predictions."""
    paths = cifar_folder(tmp_path, tiny_dataset)
    probabilities = predictor.predict(paths)

    from cifar_flax.checkpoint import load_inference
    bundle = load_inference(lenet_run)
    model = models.get_model(bundle.network, **bundle.model_options)
    x = normalize(tiny_dataset.test_images[:len(paths)], bundle.normalization)
    logits = np.asarray(model.apply(bundle.variables, x, train=False))
    np.testing.assert_array_equal(probabilities.argmax(1), logits.argmax(1))
    np.testing.assert_allclose(probabilities, np.asarray(jax.nn.softmax(logits)), atol=1e-5)
    # The tiny run learned the synthetic classes, so the comparison is not between ties.
    assert (probabilities.argmax(1) == tiny_dataset.test_labels[:len(paths)]).mean() > 0.5


def test_top_k(predictor):
    probabilities = predictor.predict(gradient_image())
    (ranked,) = predictor.top_k(probabilities, 3)
    assert len(ranked) == 3 and all(name in CLASS_NAMES for name, _ in ranked)
    assert [p for _, p in ranked] == sorted((p for _, p in ranked), reverse=True)
    assert ranked[0][1] == pytest.approx(probabilities.max())


def test_no_recompilation(lenet_run):
    fresh = load_predictor(lenet_run)
    rng = np.random.default_rng(1)
    batch = lambda n: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)  # noqa: E731
    fresh.predict(batch(1))
    assert fresh.trace_count == 1
    fresh.predict(batch(1))
    fresh.predict(gradient_image(300, 200))  # another size, same 32x32 batch of one
    assert fresh.trace_count == 1
    fresh.predict(batch(3))
    fresh.predict(batch(5))
    fresh.predict(batch(8))
    assert fresh.trace_count == 2  # 3, 5 and 8 share the bucket of 8
    fresh.predict(batch(130))  # chunks of 128 and 2 (bucket 8)
    fresh.predict(batch(128 * 2 + 20))
    assert fresh.trace_count == 4  # + buckets 128 and 32
    assert [bucket_size(n) for n in (1, 2, 8, 9, 33, 128)] == [1, 8, 8, 32, 128, 128]
    assert BATCH_BUCKETS[-1] == 128


# ---- image modes (all decoding goes through images.load_rgb32) --------------------


def save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def test_image_modes(predictor, tmp_path):
    rgb = Image.fromarray(gradient_image())
    transparent = Image.new('RGBA', (40, 30), (0, 0, 0, 0))
    white = np.full((32, 32, 3), 255, np.uint8)
    sixteen = Image.fromarray(np.full((30, 30), 32768, np.uint16))
    assert sixteen.mode.startswith('I;16')
    frames = [Image.new('RGB', (32, 32), (255, 0, 0)), Image.new('RGB', (32, 32), (0, 0, 255))]
    gif = tmp_path / 'animated.gif'
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)

    files = {
        'rgb': save(rgb, tmp_path / 'rgb.png'),
        'grayscale': save(rgb.convert('L'), tmp_path / 'gray.png'),
        'rgba': save(transparent, tmp_path / 'rgba.png'),
        'la': save(transparent.convert('LA'), tmp_path / 'la.png'),
        'palette': save(rgb.convert('P', palette=Image.Palette.ADAPTIVE), tmp_path / 'palette.png'),
        'cmyk': save(rgb.convert('CMYK'), tmp_path / 'cmyk.jpg', quality=95),
        '16-bit': save(sixteen, tmp_path / 'sixteen.png'),
        'gif': gif,
        'webp': save(rgb, tmp_path / 'photo.webp', lossless=True),
        'bmp': save(rgb, tmp_path / 'photo.bmp'),
    }
    for name, path in files.items():
        probabilities = predictor.predict(path)
        assert probabilities.shape == (1, 10), name
        np.testing.assert_allclose(probabilities.sum(), 1.0, atol=1e-5, err_msg=name)

    rgb32 = preprocess(files['rgb'])[0]
    # Transparent pixels are composited on white (not shown as their stored black).
    np.testing.assert_array_equal(preprocess(files['rgba'])[0], white)
    np.testing.assert_array_equal(preprocess(files['la'])[0], white)
    gray = preprocess(files['grayscale'])[0]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert np.abs(preprocess(files['palette'])[0].astype(int) - rgb32).mean() < 12
    assert np.abs(preprocess(files['cmyk'])[0].astype(int) - rgb32).mean() < 12
    np.testing.assert_array_equal(preprocess(files['16-bit'])[0], np.full((32, 32, 3), 128, np.uint8))
    np.testing.assert_array_equal(preprocess(files['gif'])[0][0, 0], [255, 0, 0])  # first frame
    np.testing.assert_array_equal(preprocess(files['webp'])[0], rgb32)
    np.testing.assert_array_equal(preprocess(files['bmp'])[0], rgb32)
    np.testing.assert_allclose(predictor.predict(files['rgba']), predictor.predict(white), atol=1e-6)


def test_exif_rotation_is_applied(predictor, tmp_path):
    stored = Image.fromarray(gradient_image(64, 48))
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = save(stored, tmp_path / 'rotated.jpg', exif=exif.tobytes(), quality=100)
    upright = ImageOps.exif_transpose(Image.open(path))
    assert upright.size == (48, 64)
    seen = preprocess(path)[0].astype(int)
    assert np.abs(seen - images.load_rgb32(np.asarray(upright))).mean() < 3
    assert np.abs(seen - images.load_rgb32(np.asarray(Image.open(path).convert('RGB')))).mean() > 20
    np.testing.assert_allclose(predictor.predict(path), predictor.predict(np.asarray(upright)), atol=0.02)


def test_numpy_arrays_of_any_size_and_dtype(predictor):
    rng = np.random.default_rng(2)
    arrays = {
        'uint8 HxWx3': rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
        'uint8 HxW': rng.integers(0, 256, (50, 70), dtype=np.uint8),
        'uint8 HxWx1': rng.integers(0, 256, (50, 70, 1), dtype=np.uint8),
        'uint8 HxWx4': rng.integers(0, 256, (33, 31, 4), dtype=np.uint8),
        'uint16': rng.integers(0, 65536, (40, 40, 3), dtype=np.uint16),
        'float [0,1]': rng.random((32, 32, 3)),
    }
    for name, array in arrays.items():
        probabilities = predictor.predict(array)
        assert probabilities.shape == (1, 10), name
    batch = predictor.predict(list(arrays.values()))
    assert batch.shape == (len(arrays), 10)
    # Float images in [0, 1] are scaled to 0..255.
    exact = arrays['float [0,1]']
    np.testing.assert_array_equal(preprocess(exact)[0], np.round(exact * 255).astype(np.uint8))


# ---- bad inputs: a clear error naming the file -------------------------------------


def bad_files(tmp_path: Path) -> dict[str, Path]:
    png = io.BytesIO()
    Image.fromarray(gradient_image(256, 256)).save(png, format='PNG')
    files = {
        'missing': tmp_path / 'missing.jpg',
        'directory': tmp_path / 'a_folder.png',
        'empty': tmp_path / 'empty.png',
        'not an image': tmp_path / 'notes.jpg',
        'truncated': tmp_path / 'truncated.png',
    }
    files['directory'].mkdir()
    files['empty'].write_bytes(b'')
    files['not an image'].write_text('these are not pixels\n' * 20)
    files['truncated'].write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    return files


def test_bad_inputs_name_the_file(predictor, tmp_path):
    for name, path in bad_files(tmp_path).items():
        with pytest.raises((OSError, ValueError)) as error:
            predictor.predict(path)
        assert path.name in str(error.value), name
    with pytest.raises(images.ImageError, match='Unsupported'):
        predictor.predict(12345)


def test_decompression_bomb_is_an_error(predictor, tmp_path, monkeypatch):
    path = save(Image.fromarray(gradient_image(100, 100)), tmp_path / 'bomb.png')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 2_000)
    with pytest.raises(images.ImageError, match='bomb.png'):
        predictor.predict(path)


# ---- command line ------------------------------------------------------------------


def run_cli(*args, cwd=REPO_ROOT):
    env = {**os.environ, 'PYTHONPATH': str(REPO_ROOT), 'JAX_PLATFORMS': 'cpu'}
    return subprocess.run([sys.executable, '-m', 'cifar_flax.predict', *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_cli_classifies_good_files_and_reports_bad_ones(tiny_ckpt_root, tmp_path):
    good = [save(Image.fromarray(gradient_image()), tmp_path / 'one.png'),
            save(Image.fromarray(gradient_image(90, 90)), tmp_path / 'two.jpg')]
    bad = tmp_path / 'broken.jpg'
    bad.write_text('not an image')
    result = run_cli('--model', 'lenet5', '--ckpt-root', tiny_ckpt_root, '--top-k', '3',
                     good[0], bad, good[1])
    assert result.returncode == 1, result.stderr
    assert 'Traceback' not in result.stderr
    assert 'broken.jpg' in result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(': ')[0] for line in lines] == [str(good[0]), str(good[1])]
    for line in lines:
        ranked = line.split(': ', 1)[1].split(', ')
        assert len(ranked) == 3 and all(item.split()[0] in CLASS_NAMES for item in ranked)

    result = run_cli('--model', tiny_ckpt_root / 'lenet5-seed-tiny', '--json', good[0], bad)
    assert result.returncode == 1
    output = json.loads(result.stdout)
    assert output['model']['network'] == 'lenet5'
    first, second = output['predictions']
    assert first['file'] == str(good[0]) and len(first['top_k']) == 3
    assert sum(item['probability'] for item in first['top_k']) <= 1.0 + 1e-6
    assert second['file'] == str(bad) and 'broken.jpg' in second['error']

    result = run_cli('--model', 'lenet5', '--ckpt-root', tiny_ckpt_root, good[1])
    assert result.returncode == 0 and result.stdout.startswith(str(good[1]))


def test_cli_without_params_says_how_to_train(tmp_path):
    result = run_cli('--model', 'resnet18', '--ckpt-root', tmp_path, tmp_path / 'x.jpg')
    assert result.returncode == 2
    assert 'python -m experiments.resnet18' in result.stderr and 'Traceback' not in result.stderr


# ---- the params that ship in ckpt/ -------------------------------------------------

@pytest.mark.parametrize('run_dir', SHIPPED_RUNS, ids=lambda p: p.name)
def test_shipped_params_classify_the_sample_images(run_dir):
    """A fresh clone classifies at once: every exported run in ckpt/ loads and recognises
    most of ui/samples (one photo per class), as its measured test accuracy predicts."""
    predictor = load_predictor(run_dir)
    samples = [REPO_ROOT / 'ui' / 'samples' / f'{name}.jpg' for name in CLASS_NAMES]
    probabilities = np.asarray(predictor.predict(samples))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    correct = int(np.sum(probabilities.argmax(axis=1) == np.arange(len(CLASS_NAMES))))
    accuracy = predictor.source.test_accuracy
    assert accuracy > 0.5
    # Ten photos are a small sample: ask for 3x chance, and 8 of 10 from an 80% network.
    assert correct >= (8 if accuracy >= 0.8 else 3), f'{run_dir.name}: {correct}/10 sample images right'


def test_shipped_runs_include_googlenet_and_lenet():
    assert {p.name.split('-')[0] for p in SHIPPED_RUNS} >= {'lenet5', 'inception10'}
