"""Datasets: the CIFAR reader on small files in the real python-version format, the missing-file
error, digits shapes and split, the augmentation and the batch loader."""
import os

import numpy as np
import pytest
import torch

from resfast.train.data import (
    BatchLoader, cifar_files, load_cifar, load_dataset, load_digits, random_crop_flip, write_cifar_batch,
)


def _images(rng, n):
    return rng.randint(0, 256, size=(n, 3, 32, 32)).astype(np.uint8)


@pytest.fixture()
def cifar10_dir(tmp_path):
    rng = np.random.RandomState(0)
    written = {}
    for i in range(1, 6):
        imgs, labels = _images(rng, 3), rng.randint(0, 10, 3).tolist()
        write_cifar_batch(str(tmp_path / f"data_batch_{i}"), imgs, labels)
        written[f"data_batch_{i}"] = (imgs, labels)
    imgs, labels = _images(rng, 4), [9, 0, 3, 7]
    write_cifar_batch(str(tmp_path / "test_batch"), imgs, labels)
    written["test_batch"] = (imgs, labels)
    import pickle

    with open(tmp_path / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": 3}, fh)
    return tmp_path, written


def test_cifar10_reader_returns_the_written_pixels_and_labels(cifar10_dir):
    folder, written = cifar10_dir
    train, test = load_dataset("cifar10", str(folder))
    assert train.images.shape == (15, 3, 32, 32) and train.images.dtype == torch.float32
    assert test.images.shape == (4, 3, 32, 32) and train.num_classes == test.num_classes == 10
    expected = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)]).astype(np.float32) / 255.0
    np.testing.assert_array_equal(train.images.numpy(), expected)
    assert train.labels.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert test.labels.tolist() == [9, 0, 3, 7]
    np.testing.assert_array_equal(test.images.numpy(), written["test_batch"][0].astype(np.float32) / 255.0)
    assert train.flip and test.flip


def test_cifar10_reader_finds_the_extracted_subfolder(cifar10_dir, tmp_path_factory):
    folder, _ = cifar10_dir
    parent = tmp_path_factory.mktemp("parent")
    os.symlink(folder, parent / "cifar-10-batches-py")
    train, _ = load_cifar("cifar10", str(parent))
    assert len(train) == 15


def test_cifar100_reader_uses_fine_labels(tmp_path):
    import pickle

    rng = np.random.RandomState(1)
    write_cifar_batch(str(tmp_path / "train"), _images(rng, 5), [0, 99, 42, 7, 7], label_key="fine_labels")
    write_cifar_batch(str(tmp_path / "test"), _images(rng, 2), [5, 98], label_key="fine_labels")
    with open(tmp_path / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [b"x"] * 100, b"coarse_label_names": [b"y"] * 20}, fh)
    train, test = load_dataset("cifar100", str(tmp_path))
    assert train.labels.tolist() == [0, 99, 42, 7, 7] and test.labels.tolist() == [5, 98]
    assert train.num_classes == 100


def test_missing_cifar_files_raise_file_not_found_naming_them(tmp_path):
    write_cifar_batch(str(tmp_path / "data_batch_1"), np.zeros((1, 3, 32, 32), np.uint8) + 3, [1])
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("cifar10", str(tmp_path))
    msg = str(err.value)
    for name in cifar_files("cifar10"):
        assert name in msg
    assert "missing: data_batch_2" in msg and "downloaded" in msg


def test_cifar_without_data_dir_and_unknown_dataset_are_value_errors():
    with pytest.raises(ValueError, match="--data-dir"):
        load_dataset("cifar100", None)
    with pytest.raises(ValueError, match="data must be one of .* got 'mnist'"):
        load_dataset("mnist")


def test_cifar_labels_out_of_range_are_rejected(tmp_path):
    import pickle

    rng = np.random.RandomState(2)
    write_cifar_batch(str(tmp_path / "train"), _images(rng, 2), [0, 100], label_key="fine_labels")
    write_cifar_batch(str(tmp_path / "test"), _images(rng, 1), [1], label_key="fine_labels")
    with open(tmp_path / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [b"x"] * 100}, fh)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 100\)"):
        load_dataset("cifar100", str(tmp_path))


def test_digits_shapes_and_fixed_disjoint_stratified_split():
    train, test = load_digits()
    assert train.images.shape == (1438, 3, 32, 32) and test.images.shape == (359, 3, 32, 32)
    assert train.images.min() >= 0.0 and train.images.max() <= 1.0
    assert torch.equal(train.images[:, 0], train.images[:, 2])  # grey digits on 3 channels
    assert set(train.labels.tolist()) == set(test.labels.tolist()) == set(range(10))
    counts = torch.bincount(test.labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # ~20% of each class's ~180 images
    assert not train.flip  # a mirrored digit is another symbol
    # The two splits partition sklearn's 1797 images: the split is by index, fixed.
    assert len(train) + len(test) == 1797
    again, test_again = load_digits()
    assert torch.equal(test_again.labels, test.labels) and torch.equal(again.images, train.images)


def test_random_crop_flip_moves_pixels_within_the_padding():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) + 1.0
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, padding=2, flip=False, generator=g)
    assert out.shape == x.shape
    for n in range(2):
        # Every crop is a window of the zero-padded image.
        padded = torch.nn.functional.pad(x[n], (2, 2, 2, 2))
        found = any(torch.equal(out[n], padded[:, i:i + 8, j:j + 8]) for i in range(5) for j in range(5))
        assert found
    flipped = random_crop_flip(x.repeat(16, 1, 1, 1), padding=0, flip=True, generator=g)
    n_flipped = sum(torch.equal(f, x[i % 2].flip(-1)) for i, f in enumerate(flipped))
    n_same = sum(torch.equal(f, x[i % 2]) for i, f in enumerate(flipped))
    assert n_flipped + n_same == 32 and 0 < n_flipped < 32


def test_batch_loader_normalises_covers_every_image_and_is_worker_independent():
    train, _ = load_digits()
    loader = BatchLoader(train, 500, shuffle=True, seed=3)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [500, 500, 438] and len(loader) == 3
    labels = torch.cat([y for _, y in batches])
    assert torch.equal(torch.sort(labels).values, torch.sort(train.labels).values)
    x = torch.cat([b for b, _ in batches])
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1.0) < 0.02
    drop = BatchLoader(train, 500, drop_last=True)
    assert len(drop) == 2 and drop.num_samples() == 1000
    aug = [b for b, _ in BatchLoader(train, 700, shuffle=True, augment=True, seed=5)]
    aug_workers = [b for b, _ in BatchLoader(train, 700, shuffle=True, augment=True, seed=5, workers=1)]
    assert all(torch.equal(a, b) for a, b in zip(aug, aug_workers)) and len(aug) == 3
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        BatchLoader(train, 0)
