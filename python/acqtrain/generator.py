"""Conditional generators G(z, y, c): GDFQ's two generators plus the attention-center condition.

GDFQ's CIFAR generator conditions on the label by multiplying z with a learned label embedding; its
ImageNet generator instead feeds z alone to the linear layer and lets the label enter through
class-conditional BatchNorm at three places. ACQ adds the attention-center condition c in [-1, 1]^2,
the same way in both: as a learned embedding added to the latent code, and as two constant
coordinate-offset planes (u - c_x, v - c_y) concatenated to the first feature map, so that "where"
is directly visible to the convolutions (CoordConv-style).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def _coord_planes(c: torch.Tensor, size: int) -> torch.Tensor:
    """[N, 2, size, size] planes u_w - c_x and v_h - c_y with pixel-center coordinates in [-1, 1]."""
    t = (2 * torch.arange(size, device=c.device, dtype=c.dtype) + 1) / size - 1
    u = t.view(1, 1, size).expand(c.shape[0], size, size) - c[:, 0].view(-1, 1, 1)
    v = t.view(1, size, 1).expand(c.shape[0], size, size) - c[:, 1].view(-1, 1, 1)
    return torch.stack([u, v], 1)


class _ConditionalSeed(nn.Module):
    """What both generators share: z (times the label embedding at 32 px) plus the center embedding,
    a linear map to a `width` x init_size^2 seed, and the center's coordinate planes beside it."""

    def __init__(self, num_classes: int, img_size: int, channels: int, latent_dim: int, width: int,
                 use_center: bool, downscale: int, label_in_latent: bool = True):
        super().__init__()
        if img_size % downscale:
            raise ValueError(f"img_size must be divisible by {downscale}, got {img_size}")
        self.num_classes, self.img_size, self.channels = num_classes, img_size, channels
        self.latent_dim, self.use_center, self.width = latent_dim, use_center, width
        self.init_size = img_size // downscale
        self.label_emb = nn.Embedding(num_classes, latent_dim) if label_in_latent else None
        self.center_emb = nn.Linear(2, latent_dim) if use_center else None
        self.l1 = nn.Linear(latent_dim, width * self.init_size ** 2)
        self.seed_channels = width + (2 if use_center else 0)

    def seed(self, z, labels, center=None):
        h = self.label_emb(labels) * z if self.label_emb is not None else z
        if self.use_center:
            h = h + self.center_emb(center)
        out = self.l1(h).view(z.shape[0], self.width, self.init_size, self.init_size)
        if self.use_center:
            out = torch.cat([out, _coord_planes(center.to(out.dtype), self.init_size)], 1)
        return out


class Generator(_ConditionalSeed):
    """GDFQ's CIFAR generator (two 2x upsamplings from img_size/4) with the center condition.

    GDFQ's `BatchNorm2d(C, 0.8)` passes 0.8 as eps (not momentum); kept for fidelity.
    """

    def __init__(self, num_classes: int, img_size: int = 32, channels: int = 3, latent_dim: int = 100,
                 width: int = 128, use_center: bool = True):
        super().__init__(num_classes, img_size, channels, latent_dim, width, use_center, downscale=4)
        self.conv_blocks0 = nn.BatchNorm2d(self.seed_channels)
        self.conv_blocks1 = nn.Sequential(
            nn.Conv2d(self.seed_channels, width, 3, 1, 1), nn.BatchNorm2d(width, 0.8), nn.LeakyReLU(0.2))
        self.conv_blocks2 = nn.Sequential(
            nn.Conv2d(width, width // 2, 3, 1, 1), nn.BatchNorm2d(width // 2, 0.8), nn.LeakyReLU(0.2),
            nn.Conv2d(width // 2, channels, 3, 1, 1), nn.Tanh(), nn.BatchNorm2d(channels, affine=False))

    def forward(self, z, labels, center=None):
        img = F.interpolate(self.conv_blocks0(self.seed(z, labels, center)), scale_factor=2)
        img = F.interpolate(self.conv_blocks1(img), scale_factor=2)
        return self.conv_blocks2(img)


class ClassBatchNorm2d(nn.BatchNorm2d):
    """GDFQ's CategoricalConditionalBatchNorm2d: BN without its own affine, then a per-class scale
    (initialised to 1) and shift (0) looked up from the label."""

    def __init__(self, num_classes: int, num_features: int, eps: float = 2e-5):
        super().__init__(num_features, eps=eps, affine=False)
        self.weights = nn.Embedding(num_classes, num_features)
        self.biases = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.weights.weight)
        nn.init.zeros_(self.biases.weight)

    def forward(self, x, labels):
        out = super().forward(x)
        return out * self.weights(labels)[:, :, None, None] + self.biases(labels)[:, :, None, None]


class GeneratorImageNet(_ConditionalSeed):
    """GDFQ's ImageNet generator: Linear(latent -> width x S/4 x S/4), class-conditional BN, up x2,
    conv width + CBN(eps 0.8) + LeakyReLU 0.2, up x2, conv width/2 + CBN(eps 0.8) + LeakyReLU, conv,
    tanh, BN(affine=False) — 56 -> 112 -> 224 at 224 px — with the center condition."""

    def __init__(self, num_classes: int, img_size: int = 224, channels: int = 3, latent_dim: int = 100,
                 width: int = 128, use_center: bool = True):
        super().__init__(num_classes, img_size, channels, latent_dim, width, use_center, downscale=4,
                         label_in_latent=False)
        self.bn0 = ClassBatchNorm2d(num_classes, self.seed_channels)
        self.conv1 = nn.Conv2d(self.seed_channels, width, 3, 1, 1)
        self.bn1 = ClassBatchNorm2d(num_classes, width, 0.8)
        self.conv2 = nn.Conv2d(width, width // 2, 3, 1, 1)
        self.bn2 = ClassBatchNorm2d(num_classes, width // 2, 0.8)
        self.head = nn.Sequential(nn.Conv2d(width // 2, channels, 3, 1, 1), nn.Tanh(),
                                  nn.BatchNorm2d(channels, affine=False))

    def forward(self, z, labels, center=None):
        img = F.interpolate(self.bn0(self.seed(z, labels, center), labels), scale_factor=2)
        img = F.interpolate(F.leaky_relu(self.bn1(self.conv1(img), labels), 0.2), scale_factor=2)
        return self.head(F.leaky_relu(self.bn2(self.conv2(img), labels), 0.2))


GENERATORS = ("auto", "cifar", "imagenet")


def build_generator(num_classes: int, img_size: int, channels: int, latent_dim: int = 100, width: int = 128,
                    use_center: bool = True, kind: str = "auto") -> nn.Module:
    """The conditional image generator G(z, y, c) -> images [N, channels, img_size, img_size] in [-1, 1].

    num_classes: labels y are int64 [N] in [0, num_classes).
    img_size: output height = width.
    channels: output image channels (the teacher's input channels).
    latent_dim: size of the noise z [N, latent_dim].
    width: base channel width of the generator's convolutions.
    use_center: condition on attention centers c [N, 2] in [-1, 1]^2 (ACQ); False: z and y only (GDFQ).
    kind: "cifar" (GDFQ's CIFAR generator), "imagenet" (GDFQ's ImageNet generator, class-conditional
        BatchNorm) or "auto": the ImageNet one from 128 px up, the CIFAR one below.
    """
    if kind not in GENERATORS:
        raise ValueError(f"generator must be one of {GENERATORS}, got {kind!r}")
    if kind == "auto":
        kind = "imagenet" if img_size >= 128 else "cifar"
    cls = GeneratorImageNet if kind == "imagenet" else Generator
    return cls(num_classes, img_size, channels, latent_dim, width, use_center)
