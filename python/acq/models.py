"""Classifier models the loop quantizes, and where their attention layers (residual stages) are.

Every model is built so that each ReLU call site is its own nn.ReLU module: the quantizer puts one
activation quantizer (with its own range) after each, so shared modules would share a range.
"""
from __future__ import annotations

import types

import torch
from torch import nn
import torch.nn.functional as F

from .errors import AcqError

MODELS = ("digits_net", "resnet20", "resnet18", "resnet50")

# Input geometry per model: (channels, image size) — the generator is sized from it.
INPUT_SHAPE = {
    "digits_net": (1, 16),
    "resnet20": (3, 32),
    "resnet18": (3, 224),
    "resnet50": (3, 224),
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


def _split_torchvision_relus(model: nn.Module) -> nn.Module:
    """torchvision blocks call one `relu` module 2-3 times; give each call site its own module."""
    from torchvision.models.resnet import BasicBlock as TvBasic, Bottleneck as TvBottleneck

    def basic_forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)

    def bottleneck_forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)

    for m in model.modules():
        if isinstance(m, (TvBasic, TvBottleneck)):
            n = 2 if isinstance(m, TvBasic) else 3
            del m.relu
            for i in range(1, n + 1):
                setattr(m, f"relu{i}", nn.ReLU(inplace=False))
            m.forward = types.MethodType(basic_forward if n == 2 else bottleneck_forward, m)
    model.relu = nn.ReLU(inplace=False)
    return model


def _torchvision_resnet(name: str, num_classes: int, pretrained: bool) -> nn.Module:
    try:
        import torchvision
    except ImportError as exc:  # optional dependency
        raise AcqError(f"model {name!r} needs torchvision (pip install torchvision)") from exc
    weights = None
    if pretrained:
        if num_classes != 1000:
            raise AcqError(f"torchvision's pretrained {name} has 1000 classes, not {num_classes}")
        weights = "DEFAULT"
    try:
        model = getattr(torchvision.models, name)(weights=weights, num_classes=num_classes)
    except Exception as exc:  # no network, no cache
        raise AcqError(f"could not get torchvision's pretrained {name} weights ({exc}); "
                       "pass --teacher-weights FILE instead") from exc
    return _split_torchvision_relus(model)


def build_model(name: str, num_classes: int, pretrained: bool = False) -> nn.Module:
    """A classifier by name: images [N, C, H, W] (C, H from INPUT_SHAPE[name]) -> logits [N, num_classes].

    name: one of MODELS (digits_net, resnet20, resnet18, resnet50).
    num_classes: output classes.
    pretrained: torchvision's ImageNet weights (resnet18/50 only, 1000 classes; from the local torch cache).
    """
    if name == "digits_net":
        return digits_net(num_classes)
    if name == "resnet20":
        return resnet20(num_classes)
    if name in ("resnet18", "resnet50"):
        return _torchvision_resnet(name, num_classes, pretrained)
    raise AcqError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The set S: the output of every residual stage (3 for the CIFAR nets, 4 for ResNet-18/50)."""
    names = [n for n in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, n)]
    if not names:
        raise AcqError(f"{type(model).__name__} has no residual stages (layer1..layer4) to take attention from")
    return [getattr(model, n) for n in names]


def classifier_head(model: nn.Module) -> nn.Linear:
    return model.fc


def load_teacher_weights(model: nn.Module, path: str, num_classes: int) -> None:
    """Load a user's state dict (plain, or under 'state_dict'/'model'), checking the class count first."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AcqError(f"teacher weights file not found: {path}") from None
    except Exception as exc:
        raise AcqError(f"could not read teacher weights {path}: {exc}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
    if not isinstance(obj, dict):
        raise AcqError(f"teacher weights {path} do not hold a state dict")
    obj = {k.removeprefix("module."): v for k, v in obj.items()}
    fc_w = obj.get("fc.weight")
    if fc_w is not None and fc_w.shape[0] != num_classes:
        raise AcqError(f"teacher {path} has {fc_w.shape[0]} classes but --num-classes is {num_classes}")
    missing, unexpected = model.load_state_dict(obj, strict=False)
    if missing or unexpected:
        raise AcqError(f"teacher weights {path} do not match the model: "
                       f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
