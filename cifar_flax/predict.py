"""Classify images with an exported run: ``load_predictor`` and a small CLI.

Preprocessing is the training pipeline's own (``images.load_rgb32`` then
``data.normalize``), so a photo is seen exactly as a CIFAR image folder would be.
Batches are padded to a few fixed sizes so that varying batch sizes compile the
network only a handful of times.

    python -m cifar_flax.predict --model resnet18 photo1.jpg photo2.png --top-k 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from PIL import Image

from cifar_flax import checkpoint, images, models, xla_options
from cifar_flax.data import normalize

# Padded batch sizes; larger inputs are split into chunks of the last one.
BATCH_BUCKETS = (1, 8, 32, 128)


@dataclass(frozen=True)
class Source:
    """Where a predictor's params come from."""

    run_dir: Path
    network: str
    epoch: int
    test_accuracy: float | None

    def __str__(self) -> str:
        accuracy = 'n/a' if self.test_accuracy is None else f'{100 * self.test_accuracy:.2f}%'
        return f'{self.run_dir.name} (epoch {self.epoch}, test accuracy {accuracy})'


class Predictor:
    """A network with restored params; ``predict`` maps images to class probabilities."""

    def __init__(self, bundle: checkpoint.InferenceBundle, *, conv: str = 'auto', dtype: str = 'float32'):
        options = {**dict(bundle.model_options), 'conv': conv, 'dtype': dtype}
        self.model = models.get_model(bundle.network, **options)
        self.variables = jax.device_put(bundle.variables)  # once, not on every call
        self.normalization = bundle.normalization
        self.class_names = tuple(bundle.class_names)
        self.source = Source(Path(bundle.run_dir), bundle.network, int(bundle.epoch),
                             None if bundle.test_accuracy is None else float(bundle.test_accuracy))
        self.trace_count = 0  # how often the network was traced (= compiled), for tests
        self._probabilities = xla_options.jit(self._probabilities_fn)

    @property
    def network(self) -> str:
        return self.source.network

    def _probabilities_fn(self, variables, images_uint8):
        self.trace_count += 1  # Python side effect: runs once per trace, not per call
        x = normalize(images_uint8, self.normalization)
        logits = self.model.apply(variables, x, train=False)
        return jax.nn.softmax(logits.astype(np.float32), axis=-1)

    def predict(self, images_or_image) -> np.ndarray:
        """Class probabilities (N, num_classes) for one image or a batch.

        Accepts a path, PIL image or numpy array (any size/mode), a sequence of
        those, or a 4-D array (N, H, W, C). A single image gives N = 1.
        """
        return self.predict_arrays(preprocess(images_or_image))

    def predict_arrays(self, batch_uint8: np.ndarray) -> np.ndarray:
        """Probabilities for an already-preprocessed (N, 32, 32, 3) uint8 batch."""
        batch_uint8 = np.asarray(batch_uint8)
        if batch_uint8.ndim != 4 or batch_uint8.shape[1:] != (32, 32, 3) or batch_uint8.dtype != np.uint8:
            raise ValueError(f'expected a (N, 32, 32, 3) uint8 batch, got {batch_uint8.shape} {batch_uint8.dtype}')
        chunk = BATCH_BUCKETS[-1]
        outputs = [self._predict_padded(batch_uint8[start:start + chunk])
                   for start in range(0, len(batch_uint8), chunk)]
        if not outputs:
            return np.zeros((0, len(self.class_names)), np.float32)
        return np.concatenate(outputs)

    def _predict_padded(self, batch_uint8: np.ndarray) -> np.ndarray:
        count = len(batch_uint8)
        size = bucket_size(count)
        padded = np.zeros((size, 32, 32, 3), np.uint8)
        padded[:count] = batch_uint8
        return np.asarray(self._probabilities(self.variables, padded))[:count]

    def top_k(self, probabilities: np.ndarray, k: int = 3) -> list[list[tuple[str, float]]]:
        """For each row of ``probabilities``, the k most likely (class, probability) pairs."""
        k = max(1, min(k, len(self.class_names)))
        order = np.argsort(-probabilities, axis=-1, kind='stable')[:, :k]
        return [[(self.class_names[i], float(row[i])) for i in idx] for row, idx in zip(probabilities, order)]


def bucket_size(count: int) -> int:
    """The padded batch size used for ``count`` images (count <= BATCH_BUCKETS[-1])."""
    return next(size for size in BATCH_BUCKETS if size >= count)


def preprocess(images_or_image) -> np.ndarray:
    """Turn one image or a batch into the (N, 32, 32, 3) uint8 batch the networks see."""
    if isinstance(images_or_image, np.ndarray) and images_or_image.ndim == 4:
        batch = list(images_or_image)
    elif isinstance(images_or_image, (str, os.PathLike, Image.Image, np.ndarray)):
        batch = [images_or_image]
    elif isinstance(images_or_image, Sequence):
        batch = list(images_or_image)
    else:
        raise images.ImageError(
            f'Unsupported input of type {type(images_or_image).__name__}; expected a path, PIL image, '
            'numpy array, or a sequence of those.')
    if not batch:
        return np.zeros((0, 32, 32, 3), np.uint8)
    return np.stack([images.load_rgb32(item) for item in batch])


# Experiment modules are named after the networks, except GoogLeNet's.
_EXPERIMENT_MODULES = {'inception10': 'googlenet'}


def training_command(network: str) -> str:
    """The command that trains ``network`` and exports its params."""
    return f'python -m experiments.{_EXPERIMENT_MODULES.get(network, network)}'


def resolve_run(run_or_network: str | os.PathLike, ckpt_root: str | os.PathLike = 'ckpt') -> Path:
    """A run folder given directly, or the best run for a network name under ``ckpt_root``."""
    path = Path(run_or_network)
    if path.is_dir():
        return path.parent if path.name == 'inference' else path
    try:
        network = models.canonical_name(str(run_or_network).lower())
    except ValueError:
        raise ValueError(
            f'{str(run_or_network)!r} is neither a run folder nor a network name; valid networks: '
            f'{list(models.MODEL_NAMES) + sorted(models.ALIASES)}') from None
    runs = checkpoint.find_runs(network, ckpt_root)
    if not runs:
        raise FileNotFoundError(
            f'No trained params for {network} under {ckpt_root}/; train them with '
            f'`{training_command(network)}` (or pass a run folder).')
    return Path(runs[0])


def load_predictor(run_or_network: str | os.PathLike, ckpt_root: str | os.PathLike = 'ckpt',
                   conv: str = 'auto', dtype: str = 'float32') -> Predictor:
    """Restore a run's inference export (a run folder, or a network's best run) as a Predictor."""
    bundle = checkpoint.load_inference(resolve_run(run_or_network, ckpt_root))
    return Predictor(bundle, conv=conv, dtype=dtype)


def available_runs(ckpt_root: str | os.PathLike = 'ckpt') -> dict[str, Path | None]:
    """Best run folder per network (None where no params were exported)."""
    best = {}
    for network in models.MODEL_NAMES:
        runs = checkpoint.find_runs(network, ckpt_root)
        best[network] = Path(runs[0]) if runs else None
    return best


def classify_files(predictor: Predictor, paths: Sequence[str], top_k: int = 3) -> list[dict]:
    """One record per path: {'file', 'top_k': [{'class', 'probability'}...]} or {'file', 'error'}.

    Bad files give an error record; the good ones are still classified together.
    """
    records, good, arrays = [], [], []
    for path in paths:
        try:
            arrays.append(images.load_rgb32(path))
            good.append(len(records))
            records.append({'file': path})
        except (OSError, ValueError) as error:
            records.append({'file': path, 'error': str(error)})
    if arrays:
        probabilities = predictor.predict_arrays(np.stack(arrays))
        for index, ranked in zip(good, predictor.top_k(probabilities, top_k)):
            records[index]['top_k'] = [{'class': name, 'probability': p} for name, p in ranked]
    return records


def _format_line(record: dict) -> str:
    ranked = ', '.join(f"{item['class']} {item['probability']:.3f}" for item in record['top_k'])
    return f"{record['file']}: {ranked}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m cifar_flax.predict', description='Classify image files with a trained CIFAR-10 network.')
    parser.add_argument('files', nargs='+', help='image files (jpg, png, bmp, gif, webp, ...)')
    parser.add_argument('--model', required=True,
                        help='network name (uses its best run under --ckpt-root) or a run folder')
    parser.add_argument('--ckpt-root', default='ckpt', help='folder holding the run folders (default: ckpt)')
    parser.add_argument('--top-k', type=int, default=3, help='how many classes to print per file (default: 3)')
    parser.add_argument('--json', action='store_true', help='print one JSON document instead of text lines')
    parser.add_argument('--conv', default='auto', help="convolution implementation: auto|xla|gemm")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error('--top-k must be at least 1')

    try:
        predictor = load_predictor(args.model, args.ckpt_root, conv=args.conv)
    except (OSError, ValueError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    records = classify_files(predictor, args.files, args.top_k)
    if args.json:
        source = predictor.source
        print(json.dumps({'model': {'network': source.network, 'run_dir': str(source.run_dir),
                                    'epoch': source.epoch, 'test_accuracy': source.test_accuracy},
                          'predictions': records}, indent=2))
    else:
        for record in records:
            if 'error' in record:
                print(f"error: {record['error']}", file=sys.stderr)
            else:
                print(_format_line(record))
    return 1 if any('error' in record for record in records) else 0


if __name__ == '__main__':
    sys.exit(main())
