"""Training a full-precision teacher on data the user has (and the demo's cached digits teacher)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .checkpoint import atomic_save
from .console import bars_enabled
from .data import evaluate, load_digits_split, tensor_batches
from .models import build_model


def train_teacher(model, train_data, epochs: int, lr: float = 0.1, weight_decay: float = 5e-4, device="cpu",
                  progress: bool = True, per_epoch_batches: int | None = None):
    """SGD (momentum 0.9, Nesterov) with a cosine schedule over `epochs` passes of `train_data`."""
    from tqdm import tqdm

    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps = epochs * (per_epoch_batches or len(list(iter(train_data))))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for epoch in tqdm(range(epochs), desc="teacher", disable=not bars_enabled(progress), leave=False):
        for x, y in train_data() if callable(train_data) else train_data:
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


class _ShuffledDigits:
    def __init__(self, x, y, batch_size, seed):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.g = torch.Generator().manual_seed(seed)

    def __iter__(self):
        perm = torch.randperm(len(self.y), generator=self.g)
        return tensor_batches(self.x[perm], self.y[perm], self.batch_size)


def digits_teacher(cache_path: str, seed: int = 0, epochs: int = 30, progress: bool = True):
    """(teacher, fp_accuracy, trained_now): the digits teacher, trained once and cached at `cache_path`."""
    xtr, ytr, xte, yte = load_digits_split(seed)
    torch.manual_seed(seed)  # before the model is built: its initial weights are part of the seed's teacher
    model = build_model("digits_net", 10)
    trained = False
    if os.path.isfile(cache_path):
        try:
            model.load_state_dict(torch.load(cache_path, map_location="cpu", weights_only=True))
        except Exception:  # stale or truncated cache: retrain
            model = build_model("digits_net", 10)
        else:
            return model.eval(), evaluate(model, tensor_batches(xte, yte, 512)), trained
    batches = -(-len(ytr) // 64)
    train_teacher(model, _ShuffledDigits(xtr, ytr, 64, seed), epochs, lr=0.1, progress=progress,
                  per_epoch_batches=batches)
    os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
    atomic_save(model.state_dict(), cache_path)
    return model, evaluate(model, tensor_batches(xte, yte, 512)), True
