"""The baselines, written the way a competent user writes them from the tutorials.

PyTorch's transfer-learning tutorial and torchvision's reference scripts: a torchvision
model, `model.eval()`, `torch.inference_mode()`, batch 32, default threads, an
`ImageFolder` + `DataLoader` decoding in the main process. The linear probe is
scikit-learn's `LogisticRegression` over C in 1e-4 ... 10, chosen on a validation split,
then refit on train + validation. Nothing here imports headstart.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision import datasets

BATCH = 32
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def feature_model(name: str, weights: str | None = "IMAGENET1K_V1") -> nn.Module:
    """A torchvision classifier with its last layer replaced by the identity: pooled features out."""
    model = torchvision.models.get_model(name, weights=weights)
    if name == "mobilenet_v2":
        model.classifier = nn.Identity()
    elif name.startswith("resnet"):
        model.fc = nn.Identity()
    else:
        raise ValueError(name)
    return model.eval()


def network_throughput(model: nn.Module, size: int, seconds: float = 6.0, batch: int = BATCH) -> float:
    """Images/s through the network alone, on a fixed random batch."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(x)  # warm-up
        n, t0 = 0, time.perf_counter()
        while n < 2 or time.perf_counter() - t0 < seconds:
            model(x)
            n += 1
    return n * batch / (time.perf_counter() - t0)


def transform(size: int):
    weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    return weights.transforms(crop_size=size, resize_size=round(size * 256 / 224))


def extract(model: nn.Module, folder: str, size: int, indices=None) -> tuple[np.ndarray, np.ndarray]:
    ds = datasets.ImageFolder(folder, transform=transform(size))
    if indices is not None:
        ds = torch.utils.data.Subset(ds, indices)
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=False)
    feats, labels = [], []
    with torch.inference_mode():
        for x, y in loader:
            feats.append(model(x).numpy())
            labels.append(y.numpy())
    return np.concatenate(feats), np.concatenate(labels)


def linear_probe(train_dir: str, test_dir: str, size: int = 96, val_fraction: float = 0.1, seed: int = 0) -> dict:
    """Extract, choose C on a validation split, refit on train + validation, score on test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    model = feature_model("mobilenet_v2")
    x_all, y_all = extract(model, train_dir, size)
    x_test, y_test = extract(model, test_dir, size)
    t_extract = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y_all))
    n_val = int(len(order) * val_fraction)
    val, tr = order[:n_val], order[n_val:]
    scaler = StandardScaler().fit(x_all[tr])
    best = (-1.0, None)
    for c in C_GRID:
        clf = LogisticRegression(C=c, max_iter=1000).fit(scaler.transform(x_all[tr]), y_all[tr])
        acc = clf.score(scaler.transform(x_all[val]), y_all[val])
        if acc > best[0]:
            best = (acc, c)
    scaler = StandardScaler().fit(x_all)
    clf = LogisticRegression(C=best[1], max_iter=1000).fit(scaler.transform(x_all), y_all)
    accuracy = float(clf.score(scaler.transform(x_test), y_test))
    return {"seconds": time.perf_counter() - t0, "extract_seconds": t_extract, "accuracy": accuracy,
            "C": best[1], "image_size": size}


def finetune_epoch(train_dir: str, size: int, unfreeze: int, lr: float = 1e-4, lr_head: float = 1e-3,
                   batch: int = 64, label_smoothing: float = 0.1, max_batches: int | None = None) -> dict:
    """One epoch of the textbook fine-tune done carefully in plain PyTorch: the bottom frozen in eval
    mode, the top `unfreeze` blocks and a new linear head trained with AdamW; every batch is decoded
    and goes through the whole network, frozen part included."""
    model = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")
    blocks = list(model.features)
    frozen, top = nn.Sequential(*blocks[: len(blocks) - unfreeze]), nn.Sequential(*blocks[len(blocks) - unfreeze:])
    ds = datasets.ImageFolder(train_dir, transform=transform(size))
    head = nn.Linear(1280, len(ds.classes))
    frozen.eval().requires_grad_(False)
    top.train()
    for m in top.modules():  # BatchNorm statistics kept, as in headstart's default
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    opt = torch.optim.AdamW([{"params": top.parameters(), "lr": lr}, {"params": head.parameters(), "lr": lr_head}],
                            weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    n = 0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        with torch.no_grad():
            b = frozen(x)
        logits = head(nn.functional.adaptive_avg_pool2d(top(b), 1).flatten(1))
        loss = loss_fn(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += len(y)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "images": n, "images_per_second": n / seconds}
