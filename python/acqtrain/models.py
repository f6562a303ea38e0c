"""Teacher models: the built-ins (digits_net, resnet20), torchvision classification models and
pytorchcv models (`pytorchcv:NAME`), all built with random weights, and loading a user's weights.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .errors import AcqError

BUILTINS = ("digits_net", "resnet20")
MODELS = BUILTINS  # besides: any torchvision classification model name, pytorchcv:NAME

# Input geometry of the built-ins: (channels, image size) — the generator is sized from it.
INPUT_SHAPE = {
    "digits_net": (1, 16),
    "resnet20": (3, 32),
}


class BasicBlock(nn.Module):
    """CIFAR-style basic block (option B shortcut: 1x1 conv + BN when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem conv + stages of basic blocks + global pool + linear; `stages` are the attention layers."""

    def __init__(self, in_ch: int, widths, blocks_per_stage: int, num_classes: int, stem: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=False)
        stages, cin = [], stem
        for i, w in enumerate(widths):
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(BasicBlock(cin, w, stride=2 if (i > 0 and b == 0) else 1))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def digits_net(num_classes: int = 10) -> SmallResNet:
    """The embedded default: stem 16 ch, three basic blocks 16/32/64, ~75k parameters, 16x16x1 input."""
    return SmallResNet(1, (16, 32, 64), 1, num_classes, stem=16)


def resnet20(num_classes: int = 10) -> SmallResNet:
    """CIFAR ResNet-20 (3 stages x 3 basic blocks, widths 16/32/64)."""
    return SmallResNet(3, (16, 32, 64), 3, num_classes, stem=16)


PYTORCHCV = "pytorchcv:"


def _torchvision_names() -> list[str]:
    try:
        import torchvision
    except ImportError:
        return []
    return torchvision.models.list_models(module=torchvision.models)  # classification models only


def _pytorchcv_models() -> dict:
    try:
        from pytorchcv.model_provider import _models
    except ImportError:
        raise AcqError("pytorchcv models need pytorchcv (pip install pytorchcv)") from None
    return _models


def check_model_name(name: str) -> str:
    """A built-in, a torchvision classification model name, or pytorchcv:NAME; else an AcqError."""
    if not isinstance(name, str) or not name:
        raise AcqError(f"model must be a model name, got {name!r}")
    if name in BUILTINS:
        return name
    if name.startswith(PYTORCHCV):
        if name[len(PYTORCHCV):] not in _pytorchcv_models():
            raise AcqError(f"unknown pytorchcv model {name[len(PYTORCHCV):]!r} (e.g. pytorchcv:resnet20_cifar10, "
                           "pytorchcv:mobilenetv2_w1)")
        return name
    tv = _torchvision_names()
    if name in tv:
        return name
    raise AcqError(f"unknown model {name!r}; choose one of {', '.join(BUILTINS)}, a torchvision classification "
                   f"model ({'e.g. resnet18, mobilenet_v2' if tv else 'needs torchvision'}) or pytorchcv:NAME")


def default_input_shape(model: str, dataset: str) -> tuple[int, int]:
    """(channels, image size): the built-ins' own; otherwise RGB at the dataset's size (224 for
    ImageNet and when the dataset says nothing, 32 for CIFAR and pytorchcv's *_cifar*/*_svhn* nets)."""
    if model in INPUT_SHAPE:
        return INPUT_SHAPE[model]
    if dataset in ("cifar10", "cifar100") or (model.startswith(PYTORCHCV) and any(
            t in model for t in ("_cifar", "_svhn"))):
        return 3, 32
    return 3, 224


def build_model(name: str, num_classes: int) -> nn.Module:
    """A classifier with random weights (never downloaded: weights come from the user's file):
    images [N, C, H, W] -> logits [N, num_classes].

    name: a built-in (digits_net, resnet20, resnet18, resnet50), a torchvision classification model
        name, or pytorchcv:NAME; default_input_shape(name, dataset) gives its (C, H).
    num_classes: output classes.
    """
    check_model_name(name)
    if name == "digits_net":
        return digits_net(num_classes)
    if name == "resnet20":
        return resnet20(num_classes)
    if name.startswith(PYTORCHCV):
        from pytorchcv.model_provider import get_model
        return get_model(name[len(PYTORCHCV):], pretrained=False, num_classes=num_classes)
    import torchvision
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def _state_dict_of(obj, path: str) -> dict:
    """The tensor dict inside a checkpoint: plain, or under 'state_dict' / 'model' (nested ok)."""
    for _ in range(3):
        if isinstance(obj, dict):
            inner = next((obj[k] for k in ("state_dict", "model", "model_state_dict") if isinstance(obj.get(k), dict)),
                         None)
            if inner is not None:
                obj = inner
                continue
        break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise AcqError(f"teacher weights {path} do not hold a state dict (a dict of tensors, plain or under "
                       "'state_dict' / 'model')")
    prefix = "module."  # (Distributed)DataParallel
    if all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def _listing(keys, n: int = 6) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_teacher_weights(model: nn.Module, path: str, num_classes: int | None = None) -> None:
    """Load a user's torchvision / pytorchcv / acq state dict (plain, under 'state_dict' or 'model',
    DataParallel 'module.' prefixes) into `model`, exactly: any missing, unexpected or mis-shaped key
    is an AcqError naming them."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AcqError(f"teacher weights file not found: {path}") from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AcqError(f"could not read teacher weights {path}: {first}") from None
    sd = _state_dict_of(obj, path)
    own = model.state_dict()
    optional = ("num_batches_tracked",)  # older torchvision checkpoints lack the BN counters
    missing = [k for k in own if k not in sd and not k.endswith(optional)]
    unexpected = [k for k in sd if k not in own]
    bad = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    shapes = [f"{k} {list(sd[k].shape)} (model {list(own[k].shape)})" for k in bad]
    if missing or unexpected or shapes:
        parts = [f"{label} {_listing(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if keys]
        head = ""
        if bad and num_classes is not None and not (missing or unexpected) and all(
                own[k].shape[0] == num_classes and sd[k].shape[1:] == own[k].shape[1:] for k in bad):
            head = f"teacher {path} has {sd[bad[0]].shape[0]} classes but --num-classes is {num_classes} ("
        raise AcqError((head or f"teacher weights {path} do not match {type(model).__name__}: ")
                       + "; ".join(parts) + (")" if head else ""))
    model.load_state_dict(sd, strict=False)
