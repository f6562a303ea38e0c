"""PNG of generated samples with the teacher's attention maps and centers (matplotlib, Agg)."""
from __future__ import annotations

import copy

import torch

from . import graph, ops
from .losses import FeatureTap
from .quant import WEIGHT_TYPES


@torch.no_grad()
def sample_grid(generator, teacher, path: str, num_classes: int, latent_dim: int, center_range: float = 0.5,
                per_row: int = 10, seed: int = 0, title: str = "", p: float = 2.0, device="cpu") -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = torch.Generator().manual_seed(seed)
    n = per_row
    y = torch.arange(n) % num_classes
    c = (torch.rand(n, 2, generator=g) * 2 - 1) * center_range
    z = torch.randn(n, latent_dim, generator=g)
    # G always runs in train mode (batch-statistics BN) while training: show what Q saw, on a copy so
    # that G's running statistics stay as checkpointed.
    gen = copy.deepcopy(generator).train()
    x = gen(z.to(device), y.to(device), c.to(device) if generator.use_center else None)
    traced = graph.trace(teacher)  # shares the teacher's modules; the taps go on this copy only
    graph.propagate_shapes(traced, (1, *x.shape[1:]), x.device)
    tap = FeatureTap(graph.insert_taps(traced, graph.stage_outputs(traced, WEIGHT_TYPES)))
    with tap.capture() as cap:
        pred = traced(x).argmax(1).cpu()
    tap.remove()
    feat = cap.feats[-2] if len(cap.feats) > 1 else cap.feats[-1]  # a mid-depth stage: finer map
    amap, _, center = ops.spatial_attention(feat, p=p)
    amap, center, x = amap.float().cpu(), center.float().cpu(), x.float().cpu()

    fig, axes = plt.subplots(2, n, figsize=(1.4 * n, 3.2))
    for i in range(n):
        img = x[i].permute(1, 2, 0).squeeze(-1)
        img = (img - img.min()) / (img.max() - img.min() + 1e-8)
        axes[0, i].imshow(img, cmap="gray" if x.shape[1] == 1 else None)
        axes[0, i].set_title(f"y={y[i].item()} T={pred[i].item()}", fontsize=7)
        axes[1, i].imshow(amap[i], cmap="inferno", extent=(-1, 1, 1, -1))
        axes[1, i].plot(*center[i].tolist(), "c+", ms=8, mew=2, label="center")
        if generator.use_center:
            axes[1, i].plot(*c[i].tolist(), "wx", ms=6, mew=1.5, label="target c")
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[1, 0].set_ylabel("attention", fontsize=7)
    if generator.use_center:
        axes[1, -1].legend(fontsize=5, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
