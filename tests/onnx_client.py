"""A client for headstart's ONNX export, written from model.onnx.json alone.

It imports Pillow, NumPy and ONNX Runtime, nothing of headstart, torch or torchvision
(tests/test_export.py checks both the source and the running process), and follows the
JSON's "preprocessing" steps (an input's own "preprocessing" when it has one: an ensemble's
members each take the images their own way), taking every number from the JSON (sizes, crop mode, interpolation,
mean and std).

    python onnx_client.py EXPORT_DIR IMAGE... [--no-draft]
prints {"classes": [...], "probabilities": [[...], ...], "modules": [...]} as JSON; "modules"
lists any torch, torchvision or headstart module loaded (there must be none).
--no-draft decodes JPEGs at full size: a control showing the draft step matters.
"""

import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps


def step(steps: list, op: str) -> dict:
    return next(s for s in steps if s["op"] == op)


def rule(rules: list, mode: str) -> dict:
    return next((r for r in rules if mode in r["modes"]), rules[-1])


def to_uint8(im: Image.Image) -> Image.Image:
    a = np.asarray(im).astype(np.float64)
    if im.mode == "F":
        top = 1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0
        a = np.nan_to_num(a) / top * 255.0
    elif im.mode.startswith("I;16") or (a.size and a.max() > 255):
        a = a / 65535.0 * 255.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def decode(path: str, spec: dict, draft: bool = True) -> Image.Image:
    steps = spec["decode"]
    with Image.open(path) as im:
        im.seek(0)
        if draft and im.format == "JPEG":
            size = step(steps, "jpeg_draft")["size"]
            im.draft(im.mode, (size, size))
        im.load()
        im = ImageOps.exif_transpose(im)
    rules = step(steps, "to_rgb")["rules"]
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return to_uint8(im).convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGB", im.size, tuple(rule(rules, "RGBA")["background"]))
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")


def preprocess(im: Image.Image, spec: dict) -> np.ndarray:
    steps = spec["steps"]
    resize = step(steps, "resize")
    w, h = im.size
    if spec["crop_mode"] == "squash":  # both sides to the resize size, the aspect ratio not kept
        new = (resize["width"], resize["height"])
    elif spec["crop_mode"] == "center":  # the shorter side to the resize size, the aspect ratio kept
        s = resize["shorter_side"]
        new = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    else:
        sys.exit(f"model.onnx.json: crop_mode {spec['crop_mode']!r} is unknown to this client (center, squash)")
    if new != (w, h):
        im = im.resize(new, getattr(Image.Resampling, resize["interpolation"].upper()))
    crop = step(steps, "center_crop")
    ch, cw = crop["height"], crop["width"]
    top, left = int(round((im.height - ch) / 2)), int(round((im.width - cw) / 2))
    im = im.crop((left, top, left + cw, top + ch))
    x = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)  # (3, H, W), RGB
    x = x / np.float32(step(steps, "scale")["divide_by"])
    norm = step(steps, "normalize")
    mean = np.asarray(norm["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(norm["std"], dtype=np.float32)[:, None, None]
    return (x - mean) / std


def main(argv: list) -> dict:
    draft = "--no-draft" not in argv
    folder, *images = [a for a in argv if a != "--no-draft"]
    with open(f"{folder}/model.onnx.json") as f:
        meta = json.load(f)
    feed = {}
    for inp in meta["inputs"]:  # an ensemble has one input per member, each with its own preprocessing
        spec = inp.get("preprocessing") or meta["preprocessing"]
        feed[inp["name"]] = np.stack([preprocess(decode(p, spec, draft), spec) for p in images])
    session = ort.InferenceSession(f"{folder}/{meta['file']}", providers=["CPUExecutionProvider"])
    (proba,) = session.run(["probabilities"], feed)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "headstart"))
    return {"classes": meta["classes"], "probabilities": proba.tolist(), "modules": loaded}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
