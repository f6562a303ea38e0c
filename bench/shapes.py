"""Tensor inventories of the models the issues name, generated (not typed) from their architecture.

Only shapes live here; the cases in `bench.cases` turn them into tensors at the requested batch.
"""
from __future__ import annotations

# (channels, height, width) of every BatchNorm *input*, in forward order.


def resnet20_bn_inputs() -> list[tuple[int, int, int]]:
    """CIFAR ResNet-20 (3 stages x 3 basic blocks, widths 16/32/64, 32x32 input); the first block
    of stages 2 and 3 has a 1x1-conv + BN shortcut (as in pytorchcv, which GDFQ uses)."""
    shapes = [(16, 32, 32)]  # stem
    for stage, (c, hw) in enumerate([(16, 32), (32, 16), (64, 8)]):
        for block in range(3):
            shapes += [(c, hw, hw), (c, hw, hw)]
            if stage > 0 and block == 0:
                shapes.append((c, hw, hw))
    return shapes


def resnet18_bn_inputs() -> list[tuple[int, int, int]]:
    """torchvision ResNet-18 at 224x224: 20 BN layers."""
    shapes = [(64, 112, 112)]
    for stage, (c, hw) in enumerate([(64, 56), (128, 28), (256, 14), (512, 7)]):
        for block in range(2):
            shapes += [(c, hw, hw), (c, hw, hw)]
            if stage > 0 and block == 0:
                shapes.append((c, hw, hw))  # downsample
    return shapes


def resnet50_bn_inputs() -> list[tuple[int, int, int]]:
    """torchvision ResNet-50 (v1.5: stride on the 3x3 conv) at 224x224: 53 BN layers."""
    shapes = [(64, 112, 112)]
    in_hw = 56
    for stage, (width, blocks, hw) in enumerate([(64, 3, 56), (128, 4, 28), (256, 6, 14), (512, 3, 7)]):
        for block in range(blocks):
            first_hw = in_hw if block == 0 else hw
            shapes += [(width, first_hw, first_hw), (width, hw, hw), (4 * width, hw, hw)]
            if block == 0:
                shapes.append((4 * width, hw, hw))  # downsample
        in_hw = hw
    return shapes


def resnet18_conv_weights() -> list[tuple[int, int, int, int]]:
    """(out, in, kh, kw) of every conv in torchvision ResNet-18 (fc excluded)."""
    shapes = [(64, 3, 7, 7)]
    cin = 64
    for stage, c in enumerate([64, 128, 256, 512]):
        for block in range(2):
            shapes += [(c, cin, 3, 3), (c, c, 3, 3)]
            if stage > 0 and block == 0:
                shapes.append((c, cin, 1, 1))
            cin = c
    return shapes


# Outputs of every residual stage (the attention layers S of the ACQ spec).
RESNET18_STAGES = [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]
RESNET20_STAGES = [(16, 32, 32), (32, 16, 16), (64, 8, 8)]

BN_INVENTORIES = {
    "resnet20": resnet20_bn_inputs,
    "resnet18": resnet18_bn_inputs,
    "resnet50": resnet50_bn_inputs,
}
