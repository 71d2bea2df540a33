"""Tests for cifar_flax.data on small generated folders and archives (no network, no /work/shared)."""

import io
import os
import subprocess
import sys
import tarfile
import textwrap
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cifar_flax import data
from cifar_flax.data import CLASS_NAMES, Cifar10, load_cifar10
from cifar_flax.images import ImageError

PER_CLASS = {"train": 3, "test": 2}


# --------------------------------------------------------------------------------------------
# Builders for tiny datasets
# --------------------------------------------------------------------------------------------


def _pixels(split, label, index, size=(32, 32)):
    """Deterministic, distinguishable pixels for (split, label, index)."""
    rng = np.random.default_rng(hash((split, label, index)) % 2**32)
    return rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def make_image_folder(root, suffix=".png", per_class=PER_CLASS, size=(32, 32)):
    """<root>/{train,test}/<class>/<index><suffix>; returns the expected arrays per split."""
    expected = {}
    for split, count in per_class.items():
        images, labels = [], []
        for label, name in enumerate(CLASS_NAMES):
            class_dir = root / split / name
            class_dir.mkdir(parents=True)
            for index in range(count):
                pixels = _pixels(split, label, index, size)
                Image.fromarray(pixels).save(class_dir / f"{index:04d}{suffix}")
                images.append(pixels)
                labels.append(label)
        expected[split] = (np.stack(images), np.array(labels, np.int32))
    return expected


def binary_batches(records_per_file=4, seed=0):
    """{file name: bytes} in the official format plus the expected arrays."""
    rng = np.random.default_rng(seed)
    files, expected = {}, {}
    for name in (*data.BINARY_TRAIN_FILES, data.BINARY_TEST_FILE):
        labels = rng.integers(0, 10, records_per_file).astype(np.uint8)
        images = rng.integers(0, 256, (records_per_file, 32, 32, 3), dtype=np.uint8)
        chw = images.transpose(0, 3, 1, 2).reshape(records_per_file, -1)
        files[name] = np.concatenate([labels[:, None], chw], axis=1).tobytes()
        expected[name] = (images, labels.astype(np.int32))
    return files, expected


def write_tar(path, files, folder="cifar-10-batches-bin"):
    with tarfile.open(path, "w:gz") as archive:
        for name, payload in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return path


def write_folder(path, files):
    path.mkdir(parents=True)
    for name, payload in files.items():
        (path / name).write_bytes(payload)
    return path


def assert_binary_matches(loaded, expected):
    train = [expected[name] for name in data.BINARY_TRAIN_FILES]
    np.testing.assert_array_equal(loaded.train_images, np.concatenate([i for i, _ in train]))
    np.testing.assert_array_equal(loaded.train_labels, np.concatenate([l for _, l in train]))
    np.testing.assert_array_equal(loaded.test_images, expected[data.BINARY_TEST_FILE][0])
    np.testing.assert_array_equal(loaded.test_labels, expected[data.BINARY_TEST_FILE][1])


def assert_valid_cifar(loaded):
    assert isinstance(loaded, Cifar10)
    assert loaded.class_names == CLASS_NAMES
    for images, labels in [(loaded.train_images, loaded.train_labels), (loaded.test_images, loaded.test_labels)]:
        assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
        assert labels.dtype == np.int32 and labels.shape == images.shape[:1]
        assert labels.min() >= 0 and labels.max() <= 9


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.delenv(data.CACHE_ENV, raising=False)


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


def test_image_folder_exact_pixels_labels_and_order(tmp_path, cache):
    expected = make_image_folder(tmp_path / "jpeg")
    loaded = load_cifar10(str(tmp_path / "jpeg"), cache_dir=cache)
    assert_valid_cifar(loaded)
    for split in ("train", "test"):
        np.testing.assert_array_equal(getattr(loaded, f"{split}_images"), expected[split][0])
        np.testing.assert_array_equal(getattr(loaded, f"{split}_labels"), expected[split][1])


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".bmp", ".webp", ".PNG"])
def test_image_folder_formats(tmp_path, cache, suffix):
    per_class = {"train": 1, "test": 1}
    expected = make_image_folder(tmp_path / "data", suffix=suffix, per_class=per_class)
    loaded = load_cifar10(tmp_path / "data", cache_dir=cache)
    assert_valid_cifar(loaded)
    np.testing.assert_array_equal(loaded.train_labels, np.arange(10))
    if suffix in (".bmp", ".PNG"):  # lossless formats
        np.testing.assert_array_equal(loaded.train_images, expected["train"][0])


def test_source_and_cache_from_environment(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "data", per_class={"train": 1, "test": 1})
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "data"))
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "envcache"))
    assert_valid_cifar(load_cifar10())
    assert len(list((tmp_path / "envcache").iterdir())) == 1


def test_resized_images_give_one_counting_warning(tmp_path, cache):
    root = tmp_path / "data"
    make_image_folder(root, per_class={"train": 1, "test": 1})
    for name in ("cat", "dog"):
        Image.new("RGB", (40, 48), (9, 99, 199)).save(root / "train" / name / "big.png")
    Image.new("RGB", (64, 64), (9, 99, 199)).save(root / "test" / "cat" / "big.jpg")  # JPEG draft path
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_cifar10(root, cache_dir=cache)
    resize_warnings = [w for w in caught if "resized" in str(w.message)]
    assert len(resize_warnings) == 1
    assert "3 of 23 images" in str(resize_warnings[0].message)
    assert loaded.train_images.shape == (12, 32, 32, 3)
    big = loaded.train_images[loaded.train_labels == 3][1]
    assert np.abs(big.astype(int) - (9, 99, 199)).max() <= 2


def test_missing_split_folder(tmp_path, cache):
    make_image_folder(tmp_path / "data", per_class={"train": 1})
    with pytest.raises(ValueError, match="no 'test' folder"):
        load_cifar10(tmp_path / "data", cache_dir=cache)


def test_missing_and_unknown_class_folders(tmp_path, cache):
    root = tmp_path / "data"
    make_image_folder(root, per_class={"train": 1, "test": 1})
    (root / "train" / "frog").rename(root / "train" / "frogs")
    with pytest.raises(ValueError, match="missing class folder.*frog.*unknown folder.*frogs"):
        load_cifar10(root, cache_dir=cache)


def test_empty_class_folder(tmp_path, cache):
    root = tmp_path / "data"
    make_image_folder(root, per_class={"train": 1, "test": 1})
    (root / "test" / "ship" / "0000.png").unlink()
    with pytest.raises(ValueError, match=r"empty.*test/ship"):
        load_cifar10(root, cache_dir=cache)


def test_non_image_file_is_named(tmp_path, cache):
    root = tmp_path / "data"
    make_image_folder(root, per_class={"train": 1, "test": 1})
    (root / "train" / "bird" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt"):
        load_cifar10(root, cache_dir=cache)


def test_unreadable_image_is_named(tmp_path, cache):
    root = tmp_path / "data"
    make_image_folder(root, per_class={"train": 1, "test": 1})
    (root / "train" / "bird" / "fake.jpg").write_text("not really a jpeg")
    with pytest.raises(ImageError, match="fake.jpg"):
        load_cifar10(root, cache_dir=cache)


def test_hidden_files_are_ignored(tmp_path, cache):
    root = tmp_path / "data"
    make_image_folder(root, per_class={"train": 1, "test": 1})
    (root / "train" / "bird" / ".DS_Store").write_bytes(b"\0\0")
    assert len(load_cifar10(root, cache_dir=cache).train_images) == 10


def test_parallel_subprocess_decoding_matches_serial(tmp_path, cache, monkeypatch):
    root = tmp_path / "data"
    expected = make_image_folder(root, per_class={"train": 2, "test": 1})
    monkeypatch.setattr(data, "PARALLEL_MIN_IMAGES", 1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    loaded = load_cifar10(root, cache_dir=cache)
    np.testing.assert_array_equal(loaded.train_images, expected["train"][0])
    np.testing.assert_array_equal(loaded.test_images, expected["test"][0])
    # Errors from a worker still name the file.
    (root / "test" / "deer" / "0001.png").write_text("broken")
    with pytest.raises(ImageError, match="0001.png"):
        load_cifar10(root, cache_dir=cache)


# --------------------------------------------------------------------------------------------
# Binary archive
# --------------------------------------------------------------------------------------------


def test_binary_archive(tmp_path, cache):
    files, expected = binary_batches()
    archive = write_tar(tmp_path / "cifar-10-binary.tar.gz", files)
    loaded = load_cifar10(str(archive), cache_dir=cache)
    assert_valid_cifar(loaded)
    assert_binary_matches(loaded, expected)


def test_binary_extracted_folder_and_its_parent(tmp_path, cache):
    files, expected = binary_batches()
    folder = write_folder(tmp_path / "extracted" / "cifar-10-batches-bin", files)
    (folder / "batches.meta.txt").write_text("\n".join(CLASS_NAMES))
    assert_binary_matches(load_cifar10(folder, cache_dir=cache), expected)
    assert_binary_matches(load_cifar10(tmp_path / "extracted", cache_dir=cache), expected)


def test_binary_wrong_label_names_file(tmp_path, cache):
    files, _ = binary_batches()
    corrupt = bytearray(files["data_batch_3.bin"])
    corrupt[data.BINARY_RECORD_BYTES] = 10  # label of record 1
    files["data_batch_3.bin"] = bytes(corrupt)
    with pytest.raises(ValueError, match=r"label 10 in record 1 of .*data_batch_3.bin"):
        load_cifar10(write_tar(tmp_path / "cifar-10-binary.tar.gz", files), cache_dir=cache)
    with pytest.raises(ValueError, match="data_batch_3.bin"):
        load_cifar10(write_folder(tmp_path / "cifar-10-batches-bin", files), cache_dir=cache)


def test_binary_truncated_record(tmp_path, cache):
    files, _ = binary_batches()
    files["test_batch.bin"] = files["test_batch.bin"][:-100]
    with pytest.raises(ValueError, match="Truncated.*test_batch.bin"):
        load_cifar10(write_tar(tmp_path / "cifar-10-binary.tar.gz", files), cache_dir=cache)


def test_binary_missing_batch_file(tmp_path, cache):
    files, _ = binary_batches()
    del files["data_batch_5.bin"]
    with pytest.raises(ValueError, match="lacks data_batch_5.bin"):
        load_cifar10(write_folder(tmp_path / "cifar-10-batches-bin", files), cache_dir=cache)


def test_truncated_gzip_archive(tmp_path, cache):
    files, _ = binary_batches()
    archive = write_tar(tmp_path / "cifar-10-binary.tar.gz", files)
    archive.write_bytes(archive.read_bytes()[:-200])
    with pytest.raises(ValueError, match="cifar-10-binary.tar.gz"):
        load_cifar10(archive, cache_dir=cache)


def test_python_pickle_versions_are_refused_without_unpickling(tmp_path, cache, monkeypatch):
    import pickle

    def no_unpickling(*args, **kwargs):
        raise AssertionError("must never unpickle")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    pickled = {"data_batch_1": b"\x80\x04junk", "batches.meta": b"\x80\x04junk"}
    sources = [
        write_tar(tmp_path / "cifar-10-python.tar.gz", pickled, folder="cifar-10-batches-py"),
        write_tar(tmp_path / "renamed.tar.gz", pickled, folder="cifar-10-batches-py"),
        write_folder(tmp_path / "cifar-10-batches-py", pickled),
    ]
    (tmp_path / "parent").mkdir()
    write_folder(tmp_path / "parent" / "cifar-10-batches-py", pickled)
    sources.append(tmp_path / "parent")
    for source in sources:
        with pytest.raises(ValueError, match="pickle.*cifar-10-binary.tar.gz"):
            load_cifar10(source, cache_dir=cache)


def test_unknown_sources(tmp_path, cache):
    with pytest.raises(FileNotFoundError, match="--data"):
        load_cifar10(tmp_path / "nowhere", cache_dir=cache)
    (tmp_path / "data.zip").write_bytes(b"PK")
    with pytest.raises(ValueError, match="data.zip"):
        load_cifar10(tmp_path / "data.zip", cache_dir=cache)


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def _forbid(name):
    def raiser(*args, **kwargs):
        raise AssertionError(f"{name} called on a cache hit")

    return raiser


def test_cache_hit_skips_decoding(tmp_path, cache, monkeypatch):
    expected = make_image_folder(tmp_path / "data", per_class={"train": 1, "test": 1})
    first = load_cifar10(tmp_path / "data", cache_dir=cache)
    monkeypatch.setattr(data, "_decode_files", _forbid("_decode_files"))
    second = load_cifar10(tmp_path / "data", cache_dir=cache)
    np.testing.assert_array_equal(second.train_images, first.train_images)
    np.testing.assert_array_equal(second.test_images, expected["test"][0])
    np.testing.assert_array_equal(second.test_labels, first.test_labels)


def test_cache_hit_for_archive_skips_parsing(tmp_path, cache, monkeypatch):
    files, expected = binary_batches()
    archive = write_tar(tmp_path / "cifar-10-binary.tar.gz", files)
    load_cifar10(archive, cache_dir=cache)
    monkeypatch.setattr(data, "_parse_binary_batch", _forbid("_parse_binary_batch"))
    assert_binary_matches(load_cifar10(archive, cache_dir=cache), expected)


def test_cache_invalidated_when_a_file_changes(tmp_path, cache):
    root = tmp_path / "data"
    make_image_folder(root, per_class={"train": 1, "test": 1})
    load_cifar10(root, cache_dir=cache)
    changed = root / "train" / "horse" / "0000.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(changed)  # rewritten in place
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # coarse-mtime filesystems
    reloaded = load_cifar10(root, cache_dir=cache)
    assert np.all(reloaded.train_images[7] == (1, 2, 3))
    assert len(list(cache.iterdir())) == 1  # the stale entry was removed


def test_cache_invalidated_when_a_file_is_added(tmp_path, cache):
    root = tmp_path / "data"
    make_image_folder(root, per_class={"train": 1, "test": 1})
    load_cifar10(root, cache_dir=cache)
    Image.new("RGB", (32, 32)).save(root / "test" / "cat" / "extra.png")
    assert len(load_cifar10(root, cache_dir=cache).test_images) == 11


def test_corrupt_cache_is_rebuilt(tmp_path, cache):
    make_image_folder(tmp_path / "data", per_class={"train": 1, "test": 1})
    first = load_cifar10(tmp_path / "data", cache_dir=cache)
    (entry,) = cache.iterdir()
    (entry / "train_images.npy").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable CIFAR-10 cache"):
        again = load_cifar10(tmp_path / "data", cache_dir=cache)
    np.testing.assert_array_equal(again.train_images, first.train_images)


def test_failed_cache_write_leaves_nothing_behind(tmp_path, cache, monkeypatch):
    make_image_folder(tmp_path / "data", per_class={"train": 1, "test": 1})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    with pytest.warns(UserWarning, match="Could not write CIFAR-10 cache"):
        loaded = load_cifar10(tmp_path / "data", cache_dir=cache)
    assert_valid_cifar(loaded)
    assert list(cache.iterdir()) == []  # no entry and no half-written staging folder


# --------------------------------------------------------------------------------------------
# TFDS
# --------------------------------------------------------------------------------------------


def test_tfds_source_with_mock_data(monkeypatch, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setattr(data, "_download_host_reachable", lambda *args, **kwargs: True)
    with tfds.testing.mock_data(num_examples=12):
        loaded = load_cifar10()  # default source is tfds
    assert_valid_cifar(loaded)
    assert loaded.train_images.shape == (12, 32, 32, 3)
    assert loaded.test_images.shape == (12, 32, 32, 3)


def test_tfds_offline_fails_fast_with_help(monkeypatch, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "empty_tfds"))
    monkeypatch.setattr(data, "_download_host_reachable", lambda *args, **kwargs: False)
    monkeypatch.setattr(tfds, "load", _forbid("tfds.load"))
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"unreachable.*--data /path/to/cifar10-jpeg.*CIFAR_FLAX_DATA"):
        load_cifar10("tfds")
    assert time.monotonic() - start < 10


def test_download_probe_is_bounded(monkeypatch):
    import socket

    def hanging_dns(*args, **kwargs):
        time.sleep(3)
        raise OSError("too late")

    monkeypatch.setattr(socket, "create_connection", hanging_dns)
    start = time.monotonic()
    assert data._download_host_reachable(timeout=0.2) is False
    assert time.monotonic() - start < 1.5


def test_download_probe_refused_locally():
    import socket

    with socket.socket() as server:  # bound but never listening: connection refused
        server.bind(("127.0.0.1", 0))
        address = server.getsockname()
        assert data._download_host_reachable(address, timeout=1.0) is False


def test_training_path_never_imports_tensorflow(tmp_path):
    make_image_folder(tmp_path / "data", per_class={"train": 1, "test": 1})
    files, _ = binary_batches()
    archive = write_tar(tmp_path / "cifar-10-binary.tar.gz", files)
    script = textwrap.dedent(
        f"""
        import sys
        import cifar_flax.data as data
        for source in ({str(tmp_path / "data")!r}, {str(archive)!r}):
            data.load_cifar10(source, cache_dir={str(tmp_path / "cache")!r})  # decode + write cache
            data.load_cifar10(source, cache_dir={str(tmp_path / "cache")!r})  # cache hit
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets"))
        assert not leaked, leaked
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


# --------------------------------------------------------------------------------------------
# On-device input
# --------------------------------------------------------------------------------------------


BATCH = 64
# One jitted function, one batch shape: every test reuses the same compilation.
augment = jax.jit(data.augment_images)
make_batch = jax.jit(data.make_batch, static_argnames=("augment", "normalization", "dtype"))


def _random_images(batch=BATCH, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, 256, (batch, 32, 32, 3), dtype=np.uint8))


def test_normalize_values():
    images = jnp.asarray([[[[0, 255, 51]]]], jnp.uint8)
    np.testing.assert_allclose(data.normalize(images, "unit")[0, 0, 0], [0.0, 1.0, 0.2], atol=1e-6)
    standard = data.normalize(images, "standard")[0, 0, 0]
    expected = (np.array([0.0, 1.0, 0.2]) - np.array(data.CIFAR_MEAN)) / np.array(data.CIFAR_STD)
    np.testing.assert_allclose(standard, expected, rtol=1e-5)
    assert data.normalize(images, "unit", dtype=jnp.bfloat16).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="unit, standard"):
        data.normalize(images, "zscore")


def test_augment_shapes_dtype_range_and_determinism():
    images = _random_images()
    key = jax.random.PRNGKey(3)
    out = augment(images, key)
    assert out.shape == images.shape and out.dtype == jnp.uint8
    np.testing.assert_array_equal(out, augment(images, key))  # same key, same result
    assert not np.array_equal(out, augment(images, jax.random.PRNGKey(4)))


def _manual_candidates(image):
    """Every crop of the 4-padded image, with and without a flip: {(dy, dx, flip): array}."""
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    out = {}
    for dy in range(9):
        for dx in range(9):
            crop = padded[dy : dy + 32, dx : dx + 32]
            out[(dy, dx, False)] = crop
            out[(dy, dx, True)] = crop[:, ::-1]
    return out


def test_augment_is_a_crop_of_the_padded_image_with_optional_flip():
    images = np.asarray(_random_images(seed=1))
    out = np.asarray(augment(jnp.asarray(images), jax.random.PRNGKey(0)))
    chosen = []
    for image, augmented in zip(images, out):
        matches = [k for k, c in _manual_candidates(image).items() if np.array_equal(c, augmented)]
        assert len(matches) == 1  # pixels start at 1, so zero padding makes each candidate unique
        chosen.append(matches[0])
    flips = [flip for _, _, flip in chosen]
    offsets = {(dy, dx) for dy, dx, _ in chosen}
    assert 10 < sum(flips) < BATCH - 10  # both flipped and unflipped happen
    assert len(offsets) > 10  # crops really shift
    assert all(0 <= dy <= 8 and 0 <= dx <= 8 for dy, dx in offsets)


def test_make_batch_gathers_and_augments_only_when_asked():
    images = _random_images(batch=100)
    labels = jnp.arange(100, dtype=jnp.int32) * 2
    indices = jnp.asarray(np.random.default_rng(0).integers(0, 100, BATCH), jnp.int32)
    key = jax.random.PRNGKey(0)
    x, y = make_batch(images, labels, indices, key, augment=False, normalization="unit")
    np.testing.assert_array_equal(y, 2 * np.asarray(indices))
    np.testing.assert_allclose(x, np.asarray(images)[indices] / np.float32(255.0))
    x_aug, _ = make_batch(images, labels, indices, key, augment=True, normalization="unit")
    assert x_aug.shape == (BATCH, 32, 32, 3) and x_aug.dtype == jnp.float32
    np.testing.assert_allclose(x_aug, np.asarray(augment(images[indices], key)) / np.float32(255.0))
    assert not np.allclose(x_aug, x)


def test_epoch_permutation():
    permutation = jax.jit(data.epoch_permutation, static_argnums=2)
    first = np.asarray(permutation(0, 0, 1000))
    assert first.dtype == np.int32
    np.testing.assert_array_equal(np.sort(first), np.arange(1000))
    np.testing.assert_array_equal(first, permutation(0, 0, 1000))  # deterministic
    assert not np.array_equal(first, permutation(0, 1, 1000))  # differs across epochs
    assert not np.array_equal(first, permutation(1, 0, 1000))  # and across seeds
