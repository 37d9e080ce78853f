"""Fine-tuning's pieces on tiny random inputs: the network's gradients (as timm's test_model_backward),
the batch iterator it reads images with, and an image that became unreadable during training."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import write_image_folder
from torch import nn

from headstart.nets.registry import get_backbone, seeded_init
from headstart.data.decoding import iter_batches
from headstart.learn.finetune import AugmentedImages, FineTuneNet, FineTuneSettings, fit, train_transform

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = get_backbone("small_cnn")


def _net(unfreeze, bn_update: bool = False) -> FineTuneNet:
    return FineTuneNet(SMALL, seeded_init(SMALL, 0), nn.Linear(SMALL.feature_dim, 3), unfreeze, bn_update=bn_update)


@pytest.mark.parametrize("unfreeze", [0, 1, 2, "all"])
@pytest.mark.parametrize("bn_update", [False, True])
def test_every_trainable_parameter_gets_a_gradient_and_no_frozen_one(unfreeze, bn_update):
    net = _net(unfreeze, bn_update).train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 0])
    out = net(x)
    assert out.shape == (4, 3) and not torch.isnan(out).any(), "output has NaNs or the wrong shape"
    nn.functional.cross_entropy(out, y).backward()
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in net.named_parameters() if not p.requires_grad}
    n_top = 3 if unfreeze == "all" else unfreeze
    assert len(net.trainable_blocks) == n_top
    assert all(n.startswith(("top.", "head.")) for n in trainable) and all(n.startswith("frozen.") for n in frozen)
    assert (len(frozen) == 0) == (n_top == 3)
    for name, p in trainable.items():
        assert p.grad is not None, f"{name}: no gradient"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient"
    for name, p in frozen.items():
        assert p.grad is None, f"{name}: a frozen parameter got a gradient"


def test_iter_batches_yields_every_image_in_order_and_reports_the_unreadable(tmp_path):
    data = write_image_folder(tmp_path / "data", n_per_class=5, classes=("a", "b"), size=(20, 16))
    paths = sorted(str(p) for p in data.rglob("*.png"))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    paths.insert(3, str(tmp_path / "broken.png"))
    transform = SMALL.preprocessing.transform()
    batches = list(iter_batches(paths, transform, batch_size=4))
    assert [b.size for b in batches] == [4, 4, 3]
    assert [i for b in batches for i in b.indices] == [i for i in range(11) if i != 3]
    assert [i for b in batches for i, _ in b.failed] == [3]
    whole = torch.cat([b.x for b in batches])
    assert whole.shape == (10, 3, 32, 32)
    # The same tensors as the transform of each image alone (the batch part included).
    from headstart.data.images import load_image

    assert torch.allclose(whole[0], transform(load_image(paths[0])), atol=1e-6)


def test_an_image_unreadable_during_training_is_skipped_and_reported(tmp_path, caplog):
    data = write_image_folder(tmp_path / "data", n_per_class=6, classes=("a", "b", "c"), size=(40, 40))
    paths = sorted(str(p) for p in data.rglob("*.png"))
    labels = np.arange(len(paths)) % 3
    with open(paths[4], "wb") as f:  # became unreadable after extraction
        f.write(b"\x89PNG truncated")
    images = AugmentedImages(paths, labels, train_transform(SMALL.preprocessing, "standard"), seed=0)
    s = FineTuneSettings(epochs=1, patience=5, augment="standard", batch_size=6)
    with caplog.at_level(logging.WARNING, logger="headstart"):
        result = fit(_net("all", bn_update=True), s, seed=0, train_data=images, val=None)
    assert result.epochs_run == 1 and result.images_per_second > 0
    assert any(paths[4] in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records)
