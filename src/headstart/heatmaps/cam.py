"""Class activation maps on a backbone's last feature map: CAM for a linear head, Grad-CAM for any other.

Every headstart backbone ends in global average pooling (the entry says where: `feature_map_layers`), and
every head reads the pooled vector f = mean over (h, w) of the feature map A (B, C, h, w). So:

- a linear head (logits W f + b; its feature scaler is folded into W and b, learn/heads.py) has the exact
  map CAM(h, w) = W[c] . A[:, h, w], whose mean over the grid is W[c] . f = logit - b[c]: each cell's share
  of the class score (signed: a negative cell lowered it);
- any other head (the MLP) gets Grad-CAM at that same layer: the gradient of the class logit with respect
  to A is g / (h w) at every cell, g = d logit / d f, so Grad-CAM's channel weights are g / (h w) and its map
  ReLU(sum_k g_k A_k) / (h w). Here it is drawn without the constant 1 / (h w), in the units CAM has; for a
  linear head it is exactly ReLU(CAM). The gradient flows through the head only, never back into the
  backbone: the feature map comes from the fast engine (ONNX Runtime or OpenVINO) like the pooled features
  do, and the head's backward pass costs microseconds. pytorch-grad-cam's GradCAM with the last feature
  block as target layer gives the same map up to its min-max scaling (tests/test_heatmaps.py).

Test-time flips: the mirror image's feature map is flipped back before the map is drawn, so the map of
the view pair is the mean of the two maps in the image's own orientation.
"""

from __future__ import annotations

import torch
from torch import nn

from headstart.nets.spec import Backbone

CAM, GRAD_CAM = "cam", "grad-cam"


class FeatureMapNet(nn.Module):
    """A backbone up to its global average pooling: (B, 3, H, W) -> the last feature map (B, C, h, w).

    It holds the backbone's own modules (no copy), so it changes with them; an engine runs it as it runs
    the backbone. Its tensors' names differ from the backbone's, and a converted engine caches its export
    under a digest of them, so the two exports never share a file."""

    def __init__(self, entry: Backbone, backbone: nn.Module):
        super().__init__()
        self.before_pooling = nn.ModuleList([m for _, m in entry.feature_map_layers(backbone)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.before_pooling:
            x = m(x)
        return x


def linear_weights(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weight (K, C), bias (K,)) of a head that is one nn.Linear (alone or in an nn.Sequential), else None."""
    layers = list(head) if isinstance(head, nn.Sequential) else [head]
    if len(layers) == 1 and isinstance(layers[0], nn.Linear):
        return layers[0].weight.detach(), layers[0].bias.detach()
    return None


def method_of(head: nn.Module) -> str:
    return CAM if linear_weights(head) is not None else GRAD_CAM


def pooled(fmap: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, C): what the backbone's global average pooling gives."""
    return fmap.float().mean(dim=(2, 3))


def logits(head: nn.Module, fmap: torch.Tensor) -> torch.Tensor:
    """(B, K) logits of the head on the pooled feature map."""
    head.eval()
    with torch.inference_mode():
        return head(pooled(fmap)).float()


def class_map(head: nn.Module, fmap: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, h, w): each image's map for its class `target[b]` (module docstring: CAM or Grad-CAM)."""
    fmap = fmap.float()
    weights = linear_weights(head)
    if weights is not None:
        w = weights[0].float()[target]  # (B, C)
        return torch.einsum("bc,bchw->bhw", w, fmap)
    head.eval()
    with torch.enable_grad():
        f = pooled(fmap).detach().requires_grad_(True)  # (B, C)
        score = head(f).gather(1, target[:, None]).sum()
        (g,) = torch.autograd.grad(score, f)  # (B, C): d logit[target] / d f, per image
    return torch.relu(torch.einsum("bc,bchw->bhw", g, fmap))


def view_maps(engine, pixels: torch.Tensor, normalize, mirrored: bool) -> list[torch.Tensor]:
    """The feature maps (B, C, h, w) of a batch of uint8 pixels through `engine` (a FeatureMapNet's), one per
    test-time view; the mirror view's flipped back into the image's orientation."""
    maps = [engine(pixels, normalize=normalize).float()]
    if mirrored:
        maps.append(engine(pixels.flip(-1), normalize=normalize).float().flip(-1))
    return maps
