"""Real data, only for evaluation (and for training an FP teacher): the bundled digits, or local folders.

Nothing is ever downloaded: CIFAR/ImageNet must already be on disk in torchvision's layout.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from .errors import AcqError

DATASETS = ("digits", "cifar10", "cifar100", "imagenet")
NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "imagenet": 1000}
CHANNELS = {"digits": 1, "cifar10": 3, "cifar100": 3, "imagenet": 3}  # image channels of each dataset
IMAGE_SIZE = {"digits": 16, "cifar10": 32, "cifar100": 32, "imagenet": 224}  # as loaded for evaluation


def image_shape(dataset: str) -> tuple[int, int]:
    """(channels, image size) of the dataset's evaluation images."""
    return CHANNELS[dataset], IMAGE_SIZE[dataset]
DIGITS_TRAIN, DIGITS_TEST = 1400, 397
_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_digits_split(seed: int = 0):
    """scikit-learn's digits upsampled 8x8 -> 16x16 and scaled to [-1, 1]; fixed 1400/397 split.

    Returns (x_train [1400,1,16,16], y_train, x_test [397,1,16,16], y_test) as float32/int64 tensors.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise AcqError("the digits data needs scikit-learn (pip install scikit-learn)") from exc
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1) * 2 - 1
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.from_numpy(np.random.RandomState(seed).permutation(len(y)))
    tr, te = perm[:DIGITS_TRAIN], perm[DIGITS_TRAIN:DIGITS_TRAIN + DIGITS_TEST]
    return x[tr].contiguous(), y[tr].contiguous(), x[te].contiguous(), y[te].contiguous()


def tensor_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int):
    for i in range(0, len(y), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]


class TensorData:
    """A re-iterable list of evaluation batches."""

    def __init__(self, x, y, batch_size=256):
        self.x, self.y, self.batch_size = x, y, batch_size

    def __iter__(self):
        return tensor_batches(self.x, self.y, self.batch_size)

    def __len__(self):
        return len(self.y)


def check_dataset(name: str) -> str:
    if name not in DATASETS:
        raise AcqError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return name


def _torchvision():
    try:
        import torchvision
    except ImportError as exc:
        raise AcqError("datasets other than digits need torchvision (pip install torchvision)") from exc
    return torchvision


def _loader(ds, batch_size, shuffle, workers):
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers)


def load_dataset(name: str, data_dir: str | None, train: bool, batch_size: int = 256, workers: int = 2,
                 augment: bool = False, seed: int = 0):
    """An iterable of (x, y) batches for `name`'s train or test split."""
    check_dataset(name)
    if name == "digits":
        xtr, ytr, xte, yte = load_digits_split(seed)
        return TensorData(xtr, ytr, batch_size) if train else TensorData(xte, yte, batch_size)
    if not data_dir:
        raise AcqError(f"dataset {name!r} needs --data-dir (a local folder; nothing is downloaded)")
    if not os.path.isdir(data_dir):
        raise AcqError(f"data dir not found: {data_dir}")
    tv = _torchvision()
    T = tv.transforms
    if name in ("cifar10", "cifar100"):
        tf = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []
        tf = T.Compose(tf + [T.ToTensor(), T.Normalize(_CIFAR_MEAN, _CIFAR_STD)])
        cls = tv.datasets.CIFAR10 if name == "cifar10" else tv.datasets.CIFAR100
        try:
            ds = cls(data_dir, train=train, transform=tf, download=False)
        except RuntimeError as exc:
            raise AcqError(f"no {name} data in {data_dir} ({exc})") from None
        return _loader(ds, batch_size, train, workers)
    split = os.path.join(data_dir, "train" if train else "val")
    if not os.path.isdir(split):
        raise AcqError(f"imagenet data dir must contain {'train' if train else 'val'}/ (ImageFolder layout): {split}")
    if augment:
        tf = [T.RandomResizedCrop(224), T.RandomHorizontalFlip()]
    else:
        tf = [T.Resize(256), T.CenterCrop(224)]
    tf = T.Compose(tf + [T.ToTensor(), T.Normalize(_IMAGENET_MEAN, _IMAGENET_STD)])
    return _loader(tv.datasets.ImageFolder(split, transform=tf), batch_size, train, workers)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data, device="cpu", channels_last: bool = False) -> float:
    """Top-1 accuracy (%) of `model` on `data` (model is put in eval mode)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in data:
        x = x.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        correct += (model(x).argmax(1).cpu() == y).sum().item()
        total += len(y)
    model.train(was_training)
    return 100.0 * correct / max(total, 1)
