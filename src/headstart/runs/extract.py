"""`headstart extract DATA`: fill the feature cache and nothing else, for large extraction jobs.

The cache it fills is the one `train` reads with the same backbone, weights, image size and
engine settings, so a later `train` finds every feature there. Under torchrun the ranks share
the work as `train`'s extraction does (features.extract, sharded) and rank 0 reports each
rank's throughput and the job's.
"""

from __future__ import annotations

import os

from headstart import distributed
from headstart.nets.registry import get_backbone
from headstart.data.folders import check_input, load_data
from headstart.engines.rule import choose_engine, make_engine
from headstart.errors import HeadstartError
from headstart.engines.features import FeatureCache, cache_root_of, extract, make_namespace
from headstart.nets.weights import load_backbone
from headstart.settings import TrainConfig


def extract_features(data: str | os.PathLike, *, labels: str | None = None, backbone: str = "mobilenet_v2",
                     weights: str | None = None, image_size: int | str = "auto", seed: int = 0,
                     batch_size: int = 64, workers: int | None = None, device: str = "auto", engine: str = "auto",
                     precision: str = "auto", cache_dir: str | None = None) -> dict:
    """Compute the features of every image under `data` into the cache; return counts and throughput."""
    # The settings train would refuse, refused as train does: before the folder is scanned.
    TrainConfig(data=os.fspath(data), labels=labels, backbone=backbone, weights=weights, image_size=image_size,
                seed=seed, batch_size=batch_size, workers=workers, device=device, engine=engine, precision=precision,
                cache_dir=cache_dir).validate()
    with distributed.session(device):
        root = cache_root_of(cache_dir)
        if root is None:
            raise HeadstartError("extract fills the feature cache; --cache-dir none leaves nothing to fill. Pass a "
                                 "folder, or leave --cache-dir out for the default cache.")
        check_input(data, labels)
        found, bad_rows = load_data(data, labels=labels)
        entry = get_backbone(backbone)
        if image_size == "auto":
            from headstart.strategies import auto_image_size

            size, _ = auto_image_size(found, entry.input_size, "auto")  # the size a default `train` uses
        else:
            size = int(image_size)
        prep = entry.preprocessing.scaled(size)
        model, winfo = load_backbone(entry, weights, seed=seed)
        choice = choose_engine(device, engine, precision)
        cache = FeatureCache(root, make_namespace(entry.name, winfo.identity(), prep, choice))
        paths = [s.path for s in found.samples]
        ext = extract(make_engine(model, choice, root), prep.transform(), paths, cache, batch_size=batch_size,
                      workers=workers, desc="extracting", sharded=True)
        ranks = ext.ranks or [{"rank": 0, "computed": ext.n_computed, "seconds": round(ext.seconds, 3)}]
        for r in ranks:
            r["images_per_second"] = round(r["computed"] / r["seconds"], 1) if r["computed"] and r["seconds"] else None
        return {"images": len(paths), "from_cache": ext.n_cached, "computed": ext.n_computed,
                "failed": len(ext.failures), "skipped": bad_rows + found.ignored +
                [{"path": p, "reason": r} for p, r in ext.failures.items()],
                "seconds": round(ext.seconds, 3),
                "images_per_second": round(ext.n_computed / ext.seconds, 1) if ext.n_computed and ext.seconds else None,
                "world_size": distributed.world_size(), "rank": distributed.rank(), "ranks": ranks,
                "backbone": entry.name, "image_size": size, "engine": choice.engine, "precision": choice.precision,
                "cache_dir": str(root), "cache_namespace": cache.key}
