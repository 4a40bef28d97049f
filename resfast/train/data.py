"""Datasets for ``resfast train``: scikit-learn's digits (bundled, the default) and CIFAR-10/100
read from the standard python-version pickle files. Nothing is ever downloaded.

Images are held in memory as float32 tensors in ``[0, 1]``; a :class:`BatchLoader` gathers
a batch, augments it on the batch as a whole (random crop with zero padding, horizontal
flip) and normalises it. This is much cheaper on a 2-core machine than per-sample
``torchvision.transforms`` in worker processes, and it works with any index sampler
(``DistributedSampler`` included).
"""
from __future__ import annotations

import functools
import os
import pickle
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data
from torch import Tensor

__all__ = [
    "DATASETS", "ImageDataset", "BatchLoader", "load_dataset", "load_digits", "load_cifar",
    "cifar_files", "write_cifar_batch", "random_crop_flip",
]

DATASETS = ("digits", "cifar10", "cifar100")

# Per-channel statistics of the CIFAR training sets (the values the WRN / DenseNet code uses).
_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
_CIFAR100_STD = (0.2673, 0.2564, 0.2762)


@dataclass
class ImageDataset:
    """One split of a dataset in memory.

    Attributes:
        images: ``N x 3 x H x W`` float32 in ``[0, 1]``.
        labels: ``N`` int64.
        mean, std: per-channel normalisation applied by the loader.
        num_classes: number of classes.
        flip: whether horizontal flips are a valid augmentation (not for digits).
    """

    images: Tensor
    labels: Tensor
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    num_classes: int
    flip: bool = True
    name: str = ""

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_dataset(name: str, data_dir: Optional[str] = None, *, test_fraction: float = 0.2
                 ) -> Tuple[ImageDataset, ImageDataset]:
    """``(train, test)`` for ``name`` in ``digits | cifar10 | cifar100``.

    Raises:
        ValueError: unknown ``name``, or CIFAR requested without ``data_dir``.
        FileNotFoundError: a CIFAR file is missing (the message names every expected file).
    """
    if name == "digits":
        return load_digits(test_fraction=test_fraction)
    if name in ("cifar10", "cifar100"):
        if not data_dir:
            raise ValueError(f"--data {name} needs --data-dir DIR holding the python-version files "
                             f"({', '.join(cifar_files(name))}); nothing is downloaded")
        return load_cifar(name, data_dir)
    raise ValueError(f"data must be one of {DATASETS}, got {name!r}")


def load_digits(test_fraction: float = 0.2, size: int = 32) -> Tuple[ImageDataset, ImageDataset]:
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), bilinearly upsampled
    to ``size x size`` and repeated to 3 channels, with a fixed stratified held-out test split
    (the same on every machine and every call)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    # Cached: the loader never writes into the tensors, and the study loads digits many times.
    return _load_digits(float(test_fraction), size)


@functools.lru_cache(maxsize=4)
def _load_digits(test_fraction: float, size: int) -> Tuple[ImageDataset, ImageDataset]:
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # N,1,8,8 in [0,1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    x = x.expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(bunch.target.astype(np.int64))
    # Stratified split with a fixed generator: every class contributes test_fraction of its images.
    rng = np.random.RandomState(20170523)
    test_idx = []
    for c in range(10):
        idx = np.flatnonzero(bunch.target == c)
        rng.shuffle(idx)
        test_idx.extend(idx[: int(round(len(idx) * test_fraction))].tolist())
    test_mask = np.zeros(len(y), dtype=bool)
    test_mask[np.asarray(test_idx)] = True
    train_t = torch.from_numpy(~test_mask)
    test_t = torch.from_numpy(test_mask)
    mean = tuple(float(v) for v in x[train_t].mean(dim=(0, 2, 3)))
    std = tuple(float(v) for v in x[train_t].std(dim=(0, 2, 3)))

    def make(m: Tensor) -> ImageDataset:
        return ImageDataset(x[m].contiguous(), y[m].contiguous(), mean, std, 10, flip=False, name="digits")

    return make(train_t), make(test_t)


def cifar_files(name: str) -> Tuple[str, ...]:
    """File names of the python-version CIFAR archive (``cifar-10-batches-py`` / ``cifar-100-python``)."""
    if name == "cifar10":
        return tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
    if name == "cifar100":
        return ("train", "test", "meta")
    raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")


def load_cifar(name: str, data_dir: str) -> Tuple[ImageDataset, ImageDataset]:
    """Read CIFAR-10 / CIFAR-100 from the python-version pickle files in ``data_dir``.

    ``data_dir`` may be the extracted folder itself or its parent (``cifar-10-batches-py`` /
    ``cifar-100-python`` are looked for inside it).
    """
    expected = cifar_files(name)
    folder = _find_cifar_folder(name, data_dir, expected)
    if name == "cifar10":
        train_parts = [_read_batch(os.path.join(folder, f), b"labels") for f in expected[:5]]
        xtr = np.concatenate([p[0] for p in train_parts])
        ytr = np.concatenate([p[1] for p in train_parts])
        xte, yte = _read_batch(os.path.join(folder, "test_batch"), b"labels")
        meta = _unpickle(os.path.join(folder, "batches.meta"))
        num_classes = len(meta.get(b"label_names", [])) or 10
        mean, std = _CIFAR10_MEAN, _CIFAR10_STD
    else:
        xtr, ytr = _read_batch(os.path.join(folder, "train"), b"fine_labels")
        xte, yte = _read_batch(os.path.join(folder, "test"), b"fine_labels")
        meta = _unpickle(os.path.join(folder, "meta"))
        num_classes = len(meta.get(b"fine_label_names", [])) or 100
        mean, std = _CIFAR100_MEAN, _CIFAR100_STD

    def make(xs: np.ndarray, ys: np.ndarray) -> ImageDataset:
        images = torch.from_numpy(xs.reshape(-1, 3, 32, 32)).to(torch.float32).div_(255.0)
        labels = torch.from_numpy(ys.astype(np.int64))
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"{name} labels must lie in [0, {num_classes}), got range "
                             f"[{int(labels.min())}, {int(labels.max())}] in {folder}")
        return ImageDataset(images, labels, mean, std, num_classes, flip=True, name=name)

    return make(xtr, ytr), make(xte, yte)


def write_cifar_batch(path: str, images: np.ndarray, labels: Sequence[int], label_key: str = "labels") -> None:
    """Write ``images`` (``N x 3 x 32 x 32`` uint8) in the python-version CIFAR pickle format
    (``data``: ``N x 3072`` uint8 row-major R, G, B planes; ``label_key``: list of ints).
    Used by the tests to make small files of the real format."""
    images = np.asarray(images, dtype=np.uint8)
    if images.ndim != 4 or images.shape[1:] != (3, 32, 32):
        raise ValueError(f"images must be N x 3 x 32 x 32 uint8, got shape {images.shape}")
    doc = {b"data": images.reshape(len(images), 3072), label_key.encode(): [int(v) for v in labels],
           b"batch_label": b"resfast test batch"}
    with open(path, "wb") as fh:
        pickle.dump(doc, fh, protocol=2)


def _find_cifar_folder(name: str, data_dir: str, expected: Sequence[str]) -> str:
    sub = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    for folder in (data_dir, os.path.join(data_dir, sub)):
        if all(os.path.isfile(os.path.join(folder, f)) for f in expected):
            return folder
    missing = [f for f in expected if not os.path.isfile(os.path.join(data_dir, f))]
    raise FileNotFoundError(
        f"{name}: expected the python-version files {', '.join(expected)} in {data_dir!r} "
        f"(or in {os.path.join(data_dir, sub)!r}); missing: {', '.join(missing)}. "
        f"Nothing is downloaded: extract the CIFAR python archive there.")


def _unpickle(path: str) -> dict:
    with open(path, "rb") as fh:
        return pickle.load(fh, encoding="bytes")


def _read_batch(path: str, label_key: bytes) -> Tuple[np.ndarray, np.ndarray]:
    doc = _unpickle(path)
    if b"data" not in doc or label_key not in doc:
        raise ValueError(f"{path}: not a CIFAR python batch (needs keys b'data' and {label_key!r}, "
                         f"got {sorted(doc)[:6]})")
    data = np.asarray(doc[b"data"], dtype=np.uint8)
    labels = np.asarray(doc[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: data must be N x 3072 with N labels, got {data.shape} and {labels.shape[0]} labels")
    return data, labels


def random_crop_flip(x: Tensor, padding: int = 4, flip: bool = True, generator: Optional[torch.Generator] = None
                     ) -> Tensor:
    """Random ``H x W`` crop of ``x`` zero-padded by ``padding`` on each side, and a random
    horizontal flip with probability 1/2, independently per image (the standard CIFAR augmentation)."""
    n, _, h, w = x.shape
    if padding > 0:
        xp = F.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        rows = (oy[:, None] + torch.arange(h))[:, :, None]  # n,h,1
        cols = (ox[:, None] + torch.arange(w))[:, None, :]  # n,1,w
        if flip:
            flips = torch.rand(n, generator=generator) < 0.5
            cols = torch.where(flips[:, None, None], cols.flip(-1), cols)
        # Advanced indexing gathers n x h x w x C; move channels back.
        out = xp.permute(0, 2, 3, 1)[torch.arange(n)[:, None, None], rows, cols]
        return out.permute(0, 3, 1, 2).contiguous()
    if flip:
        flips = torch.rand(n, generator=generator) < 0.5
        return torch.where(flips[:, None, None, None], x.flip(-1), x)
    return x


class BatchLoader:
    """Iterate ``(images, labels)`` batches of an :class:`ImageDataset`.

    Args:
        dataset: the split.
        batch_size: images per batch (per process under DDP).
        sampler: an iterable of indices (e.g. ``DistributedSampler``); default: a random
            permutation each epoch when ``shuffle``, else ``range(len(dataset))``.
        augment: random crop (padding 4) and, if the dataset allows it, horizontal flip.
        drop_last: drop a final incomplete batch (keeps BN away from tiny batches).
        seed: seed of the loader's own generator (shuffling and augmentation).
        workers: worker processes that assemble and augment batches (``torch.utils.data``);
            0 assembles them in this process. Every batch carries its own augmentation
            seed, so the batches are the same for any number of workers.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, *, shuffle: bool = False, augment: bool = False,
                 sampler: Optional[Iterable[int]] = None, drop_last: bool = False, seed: int = 0,
                 workers: int = 0) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an int >= 0, got {workers!r}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.sampler = sampler
        self.drop_last = drop_last
        self.workers = workers
        self.generator = torch.Generator().manual_seed(seed)
        self._mean = torch.tensor(dataset.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(dataset.std, dtype=torch.float32).view(1, 3, 1, 1)

    def _indices(self) -> Tensor:
        if self.sampler is not None:
            return torch.as_tensor(list(iter(self.sampler)), dtype=torch.int64)
        if self.shuffle:
            return torch.randperm(len(self.dataset), generator=self.generator)
        return torch.arange(len(self.dataset))

    def num_samples(self) -> int:
        """Images one pass yields."""
        n = len(self.sampler) if self.sampler is not None else len(self.dataset)  # type: ignore[arg-type]
        return (n // self.batch_size) * self.batch_size if self.drop_last else n

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.dataset)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _plan(self) -> List[Tuple[Tensor, int]]:
        idx = self._indices()
        plan = []
        for start in range(0, len(idx), self.batch_size):
            b = idx[start:start + self.batch_size]
            if self.drop_last and len(b) < self.batch_size:
                break
            plan.append((b, int(torch.randint(0, 2**62, (1,), generator=self.generator))))
        return plan

    def make_batch(self, indices: Tensor, seed: int) -> Tuple[Tensor, Tensor]:
        """The normalised (and, if ``augment``, augmented) batch of ``indices``."""
        x = self.dataset.images[indices]
        if self.augment:
            x = random_crop_flip(x, 4, self.dataset.flip, torch.Generator().manual_seed(seed))
        return (x - self._mean) / self._std, self.dataset.labels[indices]

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        plan = self._plan()
        if self.workers == 0:
            for b, seed in plan:
                yield self.make_batch(b, seed)
            return
        from torch.utils.data import DataLoader

        # batch_size=None: each item of _Planned is already a whole batch.
        yield from DataLoader(_Planned(self, plan), batch_size=None, num_workers=self.workers)


class _Planned(torch.utils.data.Dataset):
    def __init__(self, loader: BatchLoader, plan: List[Tuple[Tensor, int]]) -> None:
        self.loader, self.plan = loader, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor]:
        return self.loader.make_batch(*self.plan[i])
