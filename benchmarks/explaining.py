"""The explain section of `make bench`: explaining one image against predicting it, through the public API.

    python benchmarks/run.py --only explain          # this section alone
    python benchmarks/explaining.py DATA             # the same, printed, without touching the results files

Decisions:
- Two feature-extraction runs at 224 px (MobileNetV2's own size, where photos are explained) on a small
  FMNIST folder, one with the linear head (CAM) and one with the MLP head (Grad-CAM); their quality does
  not matter here. The timed images are 640x480 JPEGs made here (smooth random colour fields), one per
  call, so each call decodes a photo-sized file and the map is placed at its full size.
- `Model.predict([path])` and `Model.explain([path])` on the fast engine the rule picks, the feature cache
  off (`cache_dir="none"`: a cached path would skip the network) and decoding in this process
  (`workers=0`: a worker process started per call would dominate one image), median of alternating calls.
  Issue 31's goal: explain at most 3x predict for linear heads.
- For scale, pytorch-grad-cam's GradCAM (when installed) on the same network in eager torch, through the
  last feature block: what the package costs per image where headstart computes the gradient through the
  head alone (heatmaps/cam.py).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def photos(folder: Path, n: int = 8, size=(640, 480)) -> list[str]:
    """`n` JPEGs of smooth random colour fields (a photo's size, not its content)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.BICUBIC)
        paths.append(str(folder / f"photo_{i}.jpg"))
        img.save(paths[-1], quality=90)
    return paths


def _median_ms(fns: dict, images: list[str], rounds: int) -> dict:
    samples = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            path = images[r % len(images)]
            t0 = time.perf_counter()
            fns[k](path)
            samples[k].append(time.perf_counter() - t0)
    return {k: round(statistics.median(v) * 1000, 2) for k, v in samples.items()}


def grad_cam_package_ms(model, images: list[str], rounds: int) -> float | None:
    """pytorch-grad-cam's GradCAM on the model's network in eager torch (fp32), one image per call."""
    try:
        from pytorch_grad_cam import GradCAM
    except ImportError:
        return None
    import copy

    import torch

    from headstart.heatmaps.cam import FeatureMapNet

    backbone = copy.deepcopy(model.backbone).float().eval().requires_grad_(True)
    head = copy.deepcopy(model.head).float().eval()
    last = FeatureMapNet(model.entry, backbone).before_pooling[-1]
    whole = torch.nn.Sequential(backbone, head)
    transform = model.preprocessing.transform()
    from headstart.data.images import load_image

    times = []
    with GradCAM(model=whole, target_layers=[last]) as reference:
        for r in range(rounds + 1):
            t0 = time.perf_counter()
            x = transform(load_image(images[r % len(images)]))[None]
            reference(x, targets=None)
            if r:  # the first call warms up
                times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1000, 2)


def explaining(data: Path, work: Path, smoke: bool = False) -> dict:
    import headstart

    images = photos(work / "photos", n=4 if smoke else 8)
    rounds = 4 if smoke else 30
    size = 64 if smoke else 224
    out: dict = {"image": "640x480 JPEG", "image_size": size, "rounds": rounds, "heads": {}}
    for head in ("linear", "mlp"):
        run = headstart.train(data, out=work / f"explain-{head}", strategy="feature-extraction", head=head,
                              image_size=size, cache_dir=work / "explain-cache", tta="none")
        model = headstart.load(run.run_dir)
        kw = dict(cache_dir="none", workers=0)
        model.predict(images[:1], **kw)  # converts the engines and warms them up
        model.explain(images[:1], **kw)
        ms = _median_ms({"predict": lambda p: model.predict([p], **kw),
                         "explain": lambda p: model.explain([p], **kw)}, images, rounds)
        method = model.explain(images[:1], **kw)[0].method
        row = {"method": method, "predict_ms": ms["predict"], "explain_ms": ms["explain"],
               "ratio": round(ms["explain"] / ms["predict"], 2), "engine": model.engine().choice.engine}
        if head == "mlp":
            row["pytorch_grad_cam_eager_ms"] = grad_cam_package_ms(model, images, min(rounds, 10))
        out["heads"][head] = row
    out["load_average"] = round(os.getloadavg()[0], 1)  # other work on the machine slows both sides alike
    return out


def markdown(r: dict) -> list[str]:
    lines = ["", f"Explaining one image ({r['image']}, {r['image_size']} px network, {r['rounds']} calls each, median) "
             "against predicting it, through `Model.explain` and `Model.predict`, feature cache off"
             + (f" (load average {r['load_average']} at the end)" if "load_average" in r else "") + ":", "",
             "| head | map | engine | predict ms | explain ms | explain / predict |", "|---|---|---|---|---|---|"]
    for head, row in r["heads"].items():
        lines.append(f"| {head} | {row['method']} | {row['engine']} | {row['predict_ms']:.1f} | {row['explain_ms']:.1f} "
                     f"| {row['ratio']:.2f}x |")
    mlp = r["heads"].get("mlp", {})
    if mlp.get("pytorch_grad_cam_eager_ms"):
        lines += ["", f"pytorch-grad-cam's GradCAM on the same MLP-head model in eager torch: "
                      f"{mlp['pytorch_grad_cam_eager_ms']:.1f} ms per image."]
    return lines


if __name__ == "__main__":
    import json
    import tempfile

    sys.path.insert(0, str(ROOT / "src"))
    result = explaining(Path(sys.argv[1]), Path(tempfile.mkdtemp(prefix="headstart-explain-bench-")),
                        smoke="--smoke" in sys.argv)
    print(json.dumps(result, indent=2))
    print("\n".join(markdown(result)))
