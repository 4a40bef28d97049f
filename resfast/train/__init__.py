"""Training: data (digits, CIFAR-10/100), the loop, DDP, and the architecture study.

``resfast train`` / ``python -m resfast.train`` run :func:`train`; ``resfast study`` runs
:mod:`resfast.train.study`.
"""
from resfast.train.data import BatchLoader, ImageDataset, load_cifar, load_dataset, load_digits
from resfast.train.loop import TrainConfig, build_model, evaluate, lr_at, train, train_step

__all__ = ["BatchLoader", "ImageDataset", "load_cifar", "load_dataset", "load_digits", "TrainConfig",
           "build_model", "evaluate", "lr_at", "train", "train_step"]
