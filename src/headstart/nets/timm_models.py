"""timm as a backbone source: `--backbone timm:<name>` for any timm model with pooled features.

The entry is made on first use from the model itself, as timm's own feature-extraction
recipe does: `create_model(name, pretrained=False, num_classes=0)` gives the pooled
features; `pretrained_cfg` gives the preprocessing (input size, crop_pct, crop_mode,
interpolation, mean, std); `feature_info` names the stages, and the blocks for fine-tuning
are the model's children in order, with each stage container of `feature_info` opened into
its own children (ResNet: conv1, bn1, layer1..4; EfficientNet: conv_stem, bn1, blocks.0..6,
conv_head, bn2). Fine-tuning needs that sequence of children to compute the model's forward;
it is checked on a random batch when the entry is made, and a model whose forward is not such
a sequence (vision transformers add a class token and position embeddings between children)
gets no blocks: it trains by feature extraction (`--strategy auto` picks it), and asking it
to fine-tune is refused with that advice.

Weights, tried in order (a timm file has no hash known here, so none is checked; the
file's SHA-256 is recorded as its identity): `--weights FILE`, the torch hub cache
(`<hub>/checkpoints/<file name of pretrained_cfg's url>`), the Hugging Face cache
(`hf_hub_id`'s model.safetensors or pytorch_model.bin), then a download into that cache when
the machine is online. A file's classifier weights are dropped (`pretrained_cfg['classifier']`);
every other key and shape must match.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from functools import partial
from pathlib import Path

import torch
from torch import nn

from headstart.nets.spec import CROP_MODES, Backbone, Preprocessing
from headstart.errors import HeadstartError, WeightsNotFoundError

log = logging.getLogger(__name__)

PREFIX = "timm:"
HF_FILES = ("model.safetensors", "pytorch_model.bin")
# Made on first use and kept apart from the registry, so list_backbones() stays the fixed list.
_ENTRIES: dict[str, Backbone] = {}


def require_timm():
    try:
        import timm
    except ImportError:
        raise HeadstartError("timm:<name> backbones need the package timm; install it with "
                             "pip install 'headstart[timm]'.") from None
    return timm


def timm_backbone(name: str) -> Backbone:
    """The registry entry of `timm:<model name>`, made and registered on first use."""
    model_name = name[len(PREFIX):].strip()
    key = PREFIX + model_name
    if key in _ENTRIES:
        return _ENTRIES[key]
    timm = require_timm()
    if not model_name or not timm.is_model(model_name):
        close = timm.list_models(f"*{model_name.split('.')[0][:12]}*")[:8] if model_name else []
        raise HeadstartError(f"--backbone {name}: timm has no model {model_name!r}"
                             + (f"; close names: {', '.join(close)}" if close else "")
                             + ". List them with `headstart backbones --timm PATTERN`.")
    build = partial(_create, timm, model_name)
    model = build()
    cfg = model.pretrained_cfg
    classifier = cfg.get("classifier") or ""
    sequential = _is_sequence_of_children(model, int(cfg.get("input_size", (3, 224, 224))[-1]))
    entry = Backbone(
        name=key,
        build=build,
        strip_head=lambda m: m,  # built with num_classes=0: the pooled features already
        feature_dim=int(getattr(model, "head_hidden_size", None) or model.num_features),
        preprocessing=preprocessing_from_cfg(cfg, name),
        blocks=tuple(n for n, _ in _children_sequence(model) if n) if sequential else (),
        layers=_children_sequence if sequential else partial(_not_a_sequence, key),
        weights=None,
        weights_name=f"timm {model_name} ({cfg.get('hf_hub_id') or cfg.get('url') or 'no pretrained file known'})",
        num_params=sum(p.numel() for p in model.parameters()),  # without the ImageNet classifier
        gflops_224=0.0,  # not known without a measurement
        description=f"timm {model_name}",
        preprocessing_source=f"timm pretrained_cfg of {cfg.get('architecture', model_name)}"
                             f"{'.' + cfg['tag'] if cfg.get('tag') else ''}",
        adapt_state_dict=lambda sd: _drop_classifier(sd, classifier),
        find_weights=partial(timm_weights_available, model_name),
    )
    entry = dataclasses.replace(entry, load_pretrained=partial(load_pretrained, entry))
    _ENTRIES[key] = entry
    return entry


def _create(timm, model_name: str) -> nn.Module:
    """The pooled-feature model. One made for a single input size (vision transformers: fixed
    position embeddings) refuses any other with a message, not timm's assertion: asking timm for
    dynamic_img_size instead resamples the embeddings with an antialiased bicubic that the ONNX
    engine cannot export."""
    model = timm.create_model(model_name, pretrained=False, num_classes=0)
    if model.pretrained_cfg.get("fixed_input_size"):
        size = tuple(model.pretrained_cfg["input_size"][-2:])

        def check_size(module, args):
            if tuple(args[0].shape[-2:]) != size:
                raise HeadstartError(f"timm:{model_name} takes {size[0]}x{size[1]} images only (fixed position "
                                     f"embeddings), not {args[0].shape[-2]}x{args[0].shape[-1]}: pass "
                                     f"--image-size {size[0]}.")

        model.register_forward_pre_hook(check_size)
    return model


def preprocessing_from_cfg(cfg: dict, name: str = "") -> Preprocessing:
    """timm's eval transform as a Preprocessing: resize to floor(size / crop_pct), crop `size`."""
    _, h, w = cfg.get("input_size", (3, 224, 224))
    if h != w:
        raise HeadstartError(f"{name}: input size {h}x{w} is not square; headstart crops squares.")
    crop_mode = cfg.get("crop_mode") or "center"
    if crop_mode not in CROP_MODES:
        raise HeadstartError(f"{name}: timm's crop_mode {crop_mode!r} is not supported (only "
                             f"{', '.join(CROP_MODES)}).")
    crop_pct = float(cfg.get("crop_pct") or 0.875)  # timm's DEFAULT_CROP_PCT
    return Preprocessing(crop_size=int(h), resize_size=int(math.floor(h / crop_pct)),
                         interpolation=str(cfg.get("interpolation") or "bilinear"),
                         mean=tuple(float(x) for x in cfg.get("mean", (0.485, 0.456, 0.406))),
                         std=tuple(float(x) for x in cfg.get("std", (0.229, 0.224, 0.225))), crop_mode=crop_mode)


def _drop_classifier(sd: dict, classifier: str) -> dict:
    """A full checkpoint's classifier weights do not belong to the num_classes=0 model."""
    if not classifier:
        return sd
    return {k: v for k, v in sd.items() if not (k == classifier or k.startswith(classifier + "."))}


def _children_sequence(model: nn.Module) -> list[tuple[str | None, nn.Module]]:
    """The model's children in order; the stage containers `feature_info` names are opened into their children."""
    stage_parents = {m.rsplit(".", 1)[0] for m in _feature_modules(model) if "." in m}
    layers: list[tuple[str | None, nn.Module]] = []
    for name, child in model.named_children():
        if name in stage_parents:
            layers += [(f"{name}.{sub}", m) for sub, m in child.named_children()]
        else:
            layers.append((name if any(True for _ in child.parameters()) else None, child))
    return layers


def _feature_modules(model: nn.Module) -> list[str]:
    info = getattr(model, "feature_info", None) or []
    return [f["module"] for f in info if isinstance(f, dict) and f.get("module")]


def _is_sequence_of_children(model: nn.Module, native_size: int) -> bool:
    """Whether applying `_children_sequence` in turn gives the model's output (one random image, eval mode)."""
    size = native_size if model.pretrained_cfg.get("fixed_input_size") else 64
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    model.eval()
    try:
        with torch.no_grad():
            want, got = model(x), x
            for _, m in _children_sequence(model):
                got = m(got)
        return got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    except Exception:  # a child that cannot take the previous one's output: not a plain sequence
        return False


def _not_a_sequence(key: str, model: nn.Module):
    raise HeadstartError(f"{key}: its forward is not the sequence of its children, so headstart cannot cut it into "
                         "blocks for fine-tuning; use --strategy feature-extraction with it.")


# --- weights ----------------------------------------------------------------------------

def hf_cache_dir() -> Path:
    """huggingface_hub's cache folder, read from the environment each time (tests move HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                     os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(home) / "hub"


def _cfg(model_name: str) -> dict:
    cfg = require_timm().models.get_pretrained_cfg(model_name)
    return cfg.to_dict() if cfg is not None else {}


def local_candidates(model_name: str) -> list[tuple[str, Path | None]]:
    """(label, path or None) of every offline place timm's pretrained file for `model_name` may be, in order."""
    cfg = _cfg(model_name)
    out: list[tuple[str, Path | None]] = []
    if cfg.get("url"):
        out.append(("torch hub cache", Path(torch.hub.get_dir()) / "checkpoints" / cfg["url"].rsplit("/", 1)[-1]))
    if cfg.get("hf_hub_id"):
        out.append((f"Hugging Face cache {hf_cache_dir()} ({cfg['hf_hub_id']})", _hf_cached(cfg["hf_hub_id"])))
    return out


def _hf_cached(repo_id: str) -> Path | None:
    # A repository never fetched has no folder; huggingface_hub (an optional import) only for those that do.
    if not (hf_cache_dir() / f"models--{repo_id.replace('/', '--')}").is_dir():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in HF_FILES:
        hit = try_to_load_from_cache(repo_id, filename, cache_dir=str(hf_cache_dir()))
        if isinstance(hit, str):
            return Path(hit)
    return None


def timm_weights_available(model_name: str) -> str | None:
    for _, path in local_candidates(model_name):
        if path is not None and path.is_file():
            return str(path)
    return None


def load_pretrained(entry: Backbone, allow_download: bool = True):
    """The feature extractor with timm's pretrained weights from the first place that has them."""
    from headstart.nets.weights import WeightsInfo, check_compatible, read_state_dict, sha256_file

    tried = ["--weights PATH: not given"]
    model = entry.build()
    model_name = entry.name[len(PREFIX):]
    for label, path in local_candidates(model_name):
        if path is None or not path.is_file():
            tried.append(f"{label}: not found")
            continue
        sd = entry.adapt_state_dict(read_state_dict(path))
        check_compatible(model, sd, entry.name, path)
        model.load_state_dict(sd)
        return model, WeightsInfo("file", f"{label}: {path}", sha256_file(path), path=str(path))

    cfg = _cfg(model_name)
    if not (cfg.get("hf_hub_id") or cfg.get("url")):
        tried.append("download: timm knows no pretrained file for this model")
    elif allow_download and os.environ.get("HEADSTART_OFFLINE", "") in ("", "0"):
        try:
            path = _download(cfg)
            sd = entry.adapt_state_dict(read_state_dict(path))
            check_compatible(model, sd, entry.name, path)
            model.load_state_dict(sd)
            return model, WeightsInfo("file", f"download {path}", sha256_file(path), path=str(path))
        except HeadstartError:
            raise
        except Exception as exc:
            tried.append(f"download: failed ({type(exc).__name__}: {str(exc)[:120]})")
    else:
        tried.append("download: disabled (offline)")
    raise WeightsNotFoundError(
        f"no pretrained weights found for {entry.name}. Tried, in order:\n  - " + "\n  - ".join(tried)
        + f"\nTo fix: pass a state dict of {model_name} with --weights PATH (a timm checkpoint; its "
          "classifier is dropped), run once online to fill the cache, or use --weights none.")


def _download(cfg: dict) -> Path:
    if cfg.get("hf_hub_id"):
        from huggingface_hub import hf_hub_download

        for filename in HF_FILES:
            try:
                return Path(hf_hub_download(cfg["hf_hub_id"], filename, cache_dir=str(hf_cache_dir())))
            except Exception:
                if filename == HF_FILES[-1]:
                    raise
    dest = Path(torch.hub.get_dir()) / "checkpoints" / cfg["url"].rsplit("/", 1)[-1]
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(cfg["url"], str(dest), progress=False)
    return dest


def list_timm(pattern: str) -> list[dict]:
    """timm models matching `pattern` (timm.list_models' wildcards), each with its offline weights file, if any."""
    timm = require_timm()
    rows = []
    for name in timm.list_models(pattern or "*"):
        cfg = _cfg(name)
        rows.append({"name": PREFIX + name, "input": cfg.get("input_size", (None,))[-1],
                     "weights": timm_weights_available(name) if cfg else None})
    return rows

