"""CIFAR-10: host-side sources and cache, on-device batches and augmentation.

Sources (`load_cifar10(source)`; default from env CIFAR_FLAX_DATA, else "tfds"):
  * "tfds": `tfds.load("cifar10")` (TensorFlow is imported only here);
  * an ImageFolder tree `<root>/{train,test}/<class>/<image>` (decoded with
    `cifar_flax.images.load_rgb32`, the predictor's decoder);
  * the official binary archive `cifar-10-binary.tar.gz` or its extracted
    `cifar-10-batches-bin/` folder (parsed with numpy; the pickle version is refused).

Decoded folders and archives are cached as plain .npy files keyed by the source's
path, file sizes and modification times, so later loads take well under a second.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import cifar_flax.images
from cifar_flax.images import ImageError, load_rgb32_many

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel statistics of the CIFAR-10 training set, in [0, 1] units.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
NORMALIZATIONS = ("unit", "standard")

IMAGE_SIZE = 32
CROP_PADDING = 4
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

DATA_ENV = "CIFAR_FLAX_DATA"
CACHE_ENV = "CIFAR_FLAX_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/cifar_flax")
# Bump when the cached arrays or the folder decoder change meaning.
CACHE_FORMAT = 1

BINARY_ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
DOWNLOAD_HOST = ("www.cs.toronto.edu", 443)
PROBE_TIMEOUT_S = 3.0
BINARY_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
BINARY_TEST_FILE = "test_batch.bin"
BINARY_RECORD_BYTES = 1 + 3 * IMAGE_SIZE * IMAGE_SIZE  # label byte + CHW pixels
# Folder decoding below this many images stays in-process (pool start-up costs more).
PARALLEL_MIN_IMAGES = 4000

SOURCE_HELP = (
    "Point at local data with `--data /path/to/cifar10-jpeg` or CIFAR_FLAX_DATA=/path: an image folder "
    "<root>/{train,test}/<class>/<image>, the official cifar-10-binary.tar.gz, or its extracted "
    "cifar-10-batches-bin/ folder."
)


@dataclass(frozen=True, eq=False)
class Cifar10:
    """The whole dataset in host memory (images uint8 NHWC, labels int32)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...] = CLASS_NAMES

    def __post_init__(self):
        for split in SPLITS:
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dtype != np.uint8 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
                raise ValueError(f"{split} images must be uint8 (N, 32, 32, 3), got {images.dtype} {images.shape}")
            if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
                raise ValueError(f"{split} labels must be int32 ({len(images)},), got {labels.dtype} {labels.shape}")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_cifar10(source: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> Cifar10:
    """Load CIFAR-10 from `source` (argument, else $CIFAR_FLAX_DATA, else "tfds").

    Folder and archive sources are cached in `cache_dir` (argument, else
    $CIFAR_FLAX_CACHE, else ~/.cache/cifar_flax).
    """
    spec = source if source is not None else os.environ.get(DATA_ENV) or "tfds"
    if str(spec) == "tfds":
        return _load_tfds()
    path = Path(spec).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"CIFAR-10 source not found: {path}. Use 'tfds' or a local copy. {SOURCE_HELP}")
    kind, signature, load = _identify_source(path)
    cache_entry = _cache_entry(_resolve_cache_dir(cache_dir), kind, path, signature)
    cached = _read_cache(cache_entry)
    if cached is not None:
        return cached
    data = load()
    _write_cache(cache_entry, data)
    return data


def _identify_source(path: Path):
    """-> (kind, cheap signature of the source's contents, loader)."""
    if path.is_file():
        name = path.name.lower()
        if "cifar-10-python" in name or name.endswith((".pkl", ".pickle")):
            raise ValueError(_pickle_refusal(path))
        if not name.endswith((".tar.gz", ".tgz", ".tar")):
            raise ValueError(
                f"Unsupported CIFAR-10 source file: {path}. Expected cifar-10-binary.tar.gz. {SOURCE_HELP}"
            )
        stat = path.stat()
        return "binary-archive", f"{stat.st_size}:{stat.st_mtime_ns}", lambda: _load_binary_archive(path)
    batches = path / "cifar-10-batches-bin"
    if batches.is_dir():
        path = batches
    if (path / BINARY_TEST_FILE).exists() or (path / BINARY_TRAIN_FILES[0]).exists():
        return "binary-folder", _binary_folder_signature(path), lambda: _load_binary_folder(path)
    if (path / "cifar-10-batches-py").is_dir() or (path / "data_batch_1").is_file() or (path / "batches.meta").is_file():
        raise ValueError(_pickle_refusal(path))
    listing, signature = _scan_image_folder(path)
    return "image-folder", signature, lambda: _load_image_folder(path, listing)


def _pickle_refusal(path: Path) -> str:
    return (
        f"{path} looks like the Python (pickle) version of CIFAR-10, which cifar-flax refuses to load: "
        f"unpickling can run arbitrary code. Use the binary version instead, cifar-10-binary.tar.gz "
        f"({BINARY_ARCHIVE_URL}) or its extracted cifar-10-batches-bin/ folder, or an image folder."
    )


# ----- tfds ---------------------------------------------------------------------------------


def _load_tfds() -> Cifar10:
    import tensorflow_datasets as tfds  # lazy: keeps TensorFlow off every other path

    builder = tfds.builder("cifar10")
    if not os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
        # Not prepared yet: tfds would download, and without network it retries for minutes.
        if not _download_host_reachable():
            raise RuntimeError(
                f"CIFAR-10 is not prepared in the TFDS data dir ({builder.data_dir}) and the download host "
                f"{DOWNLOAD_HOST[0]} is unreachable (offline?). {SOURCE_HELP}"
            )
    splits = {}
    for split in SPLITS:
        # Batched iteration: batch_size=-1 materialises through a path that crashed under mock_data.
        dataset = tfds.load("cifar10", split=split, as_supervised=True, batch_size=10_000)
        images, labels = zip(*tfds.as_numpy(dataset))
        splits[split] = (np.concatenate(images).astype(np.uint8), np.concatenate(labels).astype(np.int32))
    num_classes = builder.info.features["label"].num_classes
    if num_classes != len(CLASS_NAMES):
        raise ValueError(f"TFDS cifar10 has {num_classes} label classes, expected {len(CLASS_NAMES)}")
    return Cifar10(*splits["train"], *splits["test"], class_names=CLASS_NAMES)


def _download_host_reachable(address: tuple[str, int] = DOWNLOAD_HOST, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Quick TCP probe; DNS lookups ignore socket timeouts, so bound it with a thread."""
    reachable = []

    def probe():
        try:
            socket.create_connection(address, timeout=timeout).close()
            reachable.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(reachable)


# ----- binary archive -----------------------------------------------------------------------


def _parse_binary_batch(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    if len(raw) == 0 or len(raw) % BINARY_RECORD_BYTES:
        raise ValueError(
            f"Truncated or malformed CIFAR-10 binary batch {name}: {len(raw)} bytes is not a whole number of "
            f"{BINARY_RECORD_BYTES}-byte records (1 label byte + 3072 pixel bytes)."
        )
    records = np.frombuffer(raw, np.uint8).reshape(-1, BINARY_RECORD_BYTES)
    labels = records[:, 0].astype(np.int32)
    if labels.max() >= len(CLASS_NAMES):
        bad = int(np.argmax(labels >= len(CLASS_NAMES)))
        raise ValueError(
            f"Invalid label {labels[bad]} in record {bad} of {name}; CIFAR-10 labels are 0..9. "
            "Is this the CIFAR-100 archive or a corrupt file?"
        )
    images = records[:, 1:].reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _assemble_binary(batches: dict[str, tuple[np.ndarray, np.ndarray]], where: Path) -> Cifar10:
    missing = [name for name in (*BINARY_TRAIN_FILES, BINARY_TEST_FILE) if name not in batches]
    if missing:
        raise ValueError(f"CIFAR-10 binary data in {where} lacks {', '.join(missing)}.")
    train = [batches[name] for name in BINARY_TRAIN_FILES]
    test_images, test_labels = batches[BINARY_TEST_FILE]
    return Cifar10(
        np.concatenate([images for images, _ in train]),
        np.concatenate([labels for _, labels in train]),
        test_images,
        test_labels,
    )


def _load_binary_archive(path: Path) -> Cifar10:
    wanted = set(BINARY_TRAIN_FILES) | {BINARY_TEST_FILE}
    batches = {}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                base = os.path.basename(member.name)
                if "cifar-10-batches-py" in member.name or base == "batches.meta":
                    raise ValueError(_pickle_refusal(path))
                if member.isfile() and base in wanted:
                    raw = archive.extractfile(member).read()
                    batches[base] = _parse_binary_batch(raw, f"{path}:{member.name}")
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ValueError(f"Cannot read CIFAR-10 archive {path}: {error}") from error
    return _assemble_binary(batches, path)


def _binary_folder_signature(path: Path) -> str:
    parts = []
    for name in (*BINARY_TRAIN_FILES, BINARY_TEST_FILE):
        try:
            stat = (path / name).stat()
            parts.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
        except FileNotFoundError:
            parts.append(f"{name}:missing")
    return ";".join(parts)


def _load_binary_folder(path: Path) -> Cifar10:
    batches = {}
    for name in (*BINARY_TRAIN_FILES, BINARY_TEST_FILE):
        file = path / name
        if file.is_file():
            batches[name] = _parse_binary_batch(file.read_bytes(), str(file))
    return _assemble_binary(batches, path)


# ----- image folder -------------------------------------------------------------------------


def _scan_image_folder(root: Path) -> tuple[dict[str, list[list[str]]], str]:
    """Validate the layout and list files: -> ({split: [files per class]}, signature).

    The signature (per class: file count, total bytes, newest mtime) needs one stat
    per file, which is what makes a cached load of 60,000 files cheap.
    """
    listing, signature = {}, []
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise ValueError(
                f"Image folder {root} has no '{split}' folder. Expected <root>/train/<class>/<image> and "
                f"<root>/test/<class>/<image>. {SOURCE_HELP}"
            )
        class_dirs = {entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith(".")}
        missing = [name for name in CLASS_NAMES if name not in class_dirs]
        unknown = sorted(class_dirs - set(CLASS_NAMES))
        if missing or unknown:
            problems = ([f"missing class folder(s) {', '.join(missing)}"] if missing else []) + (
                [f"unknown folder(s) {', '.join(unknown)}"] if unknown else []
            )
            raise ValueError(f"{split_dir}: {'; '.join(problems)}. Class folders must be exactly: {', '.join(CLASS_NAMES)}.")
        listing[split] = []
        for name in CLASS_NAMES:
            class_dir = split_dir / name
            files, total_bytes, newest = [], 0, 0
            for entry in os.scandir(class_dir):
                if entry.name.startswith("."):
                    continue  # .DS_Store and friends
                if not entry.is_file():
                    raise ValueError(f"Unexpected entry in class folder (expected only image files): {entry.path}")
                if not entry.name.lower().endswith(IMAGE_SUFFIXES):
                    raise ValueError(
                        f"Not an image file (expected {', '.join(IMAGE_SUFFIXES)}): {entry.path}"
                    )
                stat = entry.stat()
                files.append(entry.path)
                total_bytes += stat.st_size
                newest = max(newest, stat.st_mtime_ns)
            if not files:
                raise ValueError(f"Class folder is empty (no images): {class_dir}")
            files.sort()
            listing[split].append(files)
            signature.append(f"{split}/{name}:{len(files)}:{total_bytes}:{newest}")
    import PIL  # the decoder's version is part of what the cached pixels depend on

    signature.append(f"pillow:{PIL.__version__}")
    return listing, ";".join(signature)


def _load_image_folder(root: Path, listing: dict[str, list[list[str]]]) -> Cifar10:
    files = [file for split in SPLITS for class_files in listing[split] for file in class_files]
    images, resized = _decode_files(files)  # both splits in one go: one round of worker start-up
    if resized:
        warnings.warn(
            f"{resized} of {len(files)} images in {root} were not 32x32 and were resized to 32x32.",
            stacklevel=4,  # the caller of load_cifar10
        )
    arrays, start = {}, 0
    for split in SPLITS:
        counts = [len(class_files) for class_files in listing[split]]
        labels = np.repeat(np.arange(len(CLASS_NAMES), dtype=np.int32), counts)
        arrays[split] = (images[start : start + len(labels)], labels)
        start += len(labels)
    return Cifar10(*arrays["train"], *arrays["test"])


def _decode_files(files: list[str]) -> tuple[np.ndarray, int]:
    """Decode with load_rgb32, sharing the files between this process and worker
    subprocesses. Processes, not threads: most of the per-image cost is Python and
    holds the GIL. Fresh interpreters, not fork (unsafe once JAX runs threads) nor
    multiprocessing's spawn (re-imports the caller's __main__ script)."""
    workers = min(len(os.sched_getaffinity(0)), 8)
    if len(files) < PARALLEL_MIN_IMAGES or workers < 2 or not sys.executable:
        return load_rgb32_many(files)
    shares = [files[start::workers] for start in range(workers)]  # interleaved: similar work per share
    package_parent = str(Path(cifar_flax.images.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-c", "import sys; from cifar_flax.images import decode_worker_main; sys.exit(decode_worker_main())"]
    processes = [
        subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        for _ in shares[1:]
    ]
    try:
        with concurrent.futures.ThreadPoolExecutor(len(processes)) as pool:
            replies = [
                pool.submit(process.communicate, b"\0".join(os.fsencode(file) for file in share))
                for process, share in zip(processes, shares[1:])
            ]
            results = [load_rgb32_many(shares[0])]  # this process takes the first share meanwhile
            for process, reply in zip(processes, replies):
                results.append(_worker_result(process, *reply.result()))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    images = np.empty((len(files), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for start, (share_images, _) in enumerate(results):
        images[start::workers] = share_images
    return images, sum(resized for _, resized in results)


def _worker_result(process: subprocess.Popen, stdout: bytes, stderr: bytes) -> tuple[np.ndarray, int]:
    message = stderr.decode(errors="replace").strip()
    if process.returncode != 0:
        error_type, _, text = message.partition(": ")
        error_class = {"FileNotFoundError": FileNotFoundError, "IsADirectoryError": IsADirectoryError}.get(error_type)
        if process.returncode == 2 and text:
            raise (error_class or ImageError)(text)
        raise RuntimeError(f"Image decoding subprocess failed (exit status {process.returncode}): {message[-2000:]}")
    resized = int(np.frombuffer(stdout[:8], "<i8")[0])
    return np.frombuffer(stdout, np.uint8, offset=8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 3), resized


# ----- cache --------------------------------------------------------------------------------


def _resolve_cache_dir(cache_dir) -> Path:
    chosen = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    return Path(chosen).expanduser()


_CACHE_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def _cache_entry(cache_dir: Path, kind: str, path: Path, signature: str) -> Path:
    """A folder of plain .npy files (np.load of .npy runs at memcpy speed; .npz
    members go through zipfile's copy + CRC and take ~3x longer)."""
    source_id = hashlib.sha256(f"{kind}:{path}".encode()).hexdigest()[:12]
    content_id = hashlib.sha256(f"{CACHE_FORMAT}:{signature}".encode()).hexdigest()[:12]
    return cache_dir / f"cifar10-{kind}-{source_id}-{content_id}"


def _read_cache(entry: Path) -> Cifar10 | None:
    if not entry.is_dir():
        return None
    try:
        return Cifar10(*(np.load(entry / f"{key}.npy", allow_pickle=False) for key in _CACHE_KEYS))
    except (OSError, ValueError) as error:
        warnings.warn(f"Ignoring unreadable CIFAR-10 cache {entry} ({error}); rebuilding it.", stacklevel=3)
        shutil.rmtree(entry, ignore_errors=True)
        return None


def _write_cache(entry: Path, data: Cifar10) -> None:
    """Write into a temporary folder, then rename it into place (atomic: a crash
    leaves no partial entry), then drop stale entries of the same source."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    except OSError as error:
        warnings.warn(f"Could not create CIFAR-10 cache folder {entry.parent}: {error}", stacklevel=3)
        return
    try:
        for key in _CACHE_KEYS:
            with open(staging / f"{key}.npy", "wb") as file:
                np.save(file, getattr(data, key), allow_pickle=False)
                file.flush()
                os.fsync(file.fileno())
        os.rename(staging, entry)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        if not entry.is_dir():  # a concurrent loader may have won the race; fine
            warnings.warn(f"Could not write CIFAR-10 cache {entry}: {error}", stacklevel=3)
        return
    source_prefix = entry.name.rsplit("-", 1)[0] + "-"
    for stale in entry.parent.glob(source_prefix + "*"):
        if stale != entry and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# On device (pure, jittable)
# --------------------------------------------------------------------------------------------


def normalize(images_uint8: jax.Array, normalization: str, dtype=jnp.float32) -> jax.Array:
    """uint8 pixels -> float: 'unit' is x/255, 'standard' is (x/255 - mean) / std per channel."""
    x = jnp.asarray(images_uint8).astype(jnp.float32) / 255.0
    if normalization == "standard":
        x = (x - jnp.asarray(CIFAR_MEAN, jnp.float32)) / jnp.asarray(CIFAR_STD, jnp.float32)
    elif normalization != "unit":
        raise ValueError(f"Unknown normalization {normalization!r}; valid: {', '.join(NORMALIZATIONS)}")
    return x.astype(dtype)


def augment_images(images_uint8: jax.Array, key: jax.Array) -> jax.Array:
    """Per image: random crop of the 4-pixel zero-padded image, then random horizontal flip."""
    batch, height, width, channels = images_uint8.shape
    crop_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * CROP_PADDING + 1)
    flips = jax.random.bernoulli(flip_key, 0.5, (batch,))
    pad = CROP_PADDING
    padded = jnp.pad(images_uint8, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def crop(image, offset):
        return lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    cropped = jax.vmap(crop)(padded, offsets)
    return jnp.where(flips[:, None, None, None], cropped[:, :, ::-1], cropped)


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> jax.Array:
    """The example order of one epoch, a pure function of (seed, epoch)."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), epoch)
    return jax.random.permutation(key, num_examples).astype(jnp.int32)


def make_batch(
    images_uint8: jax.Array,
    labels: jax.Array,
    indices: jax.Array,
    key: jax.Array,
    *,
    augment: bool,
    normalization: str,
    dtype=jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """Gather `indices` from device-resident uint8 images, augment if asked, normalize.

    Keep the full arrays on device (jax.device_put once) so a jitted call moves no data.
    """
    # Indices come from a permutation, always in range: "clip" skips the out-of-range fill masking.
    x = jnp.take(images_uint8, indices, axis=0, mode="clip")
    y = jnp.take(labels, indices, axis=0, mode="clip")
    if augment:
        x = augment_images(x, key)
    return normalize(x, normalization, dtype), y
