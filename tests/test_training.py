"""training.py's steps, one at a time, on small real inputs (the end-to-end runs are in test_runs.py)."""

from __future__ import annotations

import csv
import logging
import os

import numpy as np
import pytest
from PIL import Image

from conftest import write_image_folder
from headstart.runs import context, outputs
from headstart.strategies import configure
from headstart.runs import train as training
from headstart.nets.registry import get_backbone
from headstart.data.folders import load_data
from headstart.errors import DataError, HeadstartError
from headstart.engines.features import Extraction
from headstart.settings import TrainConfig


def _data(root, **kw):
    data, _ = load_data(str(root), val_fraction=0.2, test_fraction=0.2)
    return data


def test_auto_image_size_for_fine_tuning_upsamples_small_images_at_most_four_times(tmp_path):
    small = _data(write_image_folder(tmp_path / "s", n_per_class=4, size=(20, 18)))
    size, reason = training.auto_image_size(small, 224, "fine-tune")
    assert size == 96 and "median image side 18 px" in reason  # ceil(18 * 4 / 32) * 32
    assert training.auto_image_size(small, 224, "feature-extraction")[0] == 160  # 0.7 x 224, a multiple of 32
    tiny = _data(write_image_folder(tmp_path / "t", n_per_class=4, size=(6, 6)))
    assert training.auto_image_size(tiny, 224, "fine-tune")[0] == 64  # never below 64 px
    large = _data(write_image_folder(tmp_path / "l", n_per_class=2, size=(300, 260)))
    size, reason = training.auto_image_size(large, 224)
    assert size == 224 and reason.startswith("backbone default 224 px")


def test_auto_image_size_without_readable_sizes_keeps_the_default(tmp_path):
    root = write_image_folder(tmp_path / "d", n_per_class=2, size=(8, 8))
    data = _data(root)
    for s in data.samples:  # every sampled file unreadable: truncated to nothing after the scan
        open(s.path, "wb").close()
    assert training.auto_image_size(data, 160) == (160, "backbone default 160 px (image sizes unknown)")


def test_choose_image_size_takes_an_asked_size_as_given(tmp_path):
    data = _data(write_image_folder(tmp_path / "d", n_per_class=2, size=(8, 8)))
    entry = get_backbone("mobilenet_v2")
    assert context.choose_image_size(TrainConfig(data="x", image_size=48), entry, data) == (48, "asked for")
    assert context.choose_image_size(TrainConfig(data="x", image_size="48"), entry, data) == (48, "asked for")
    assert context.choose_image_size(TrainConfig(data="x"), entry, data)[0] == 160  # auto, 2 images per class
    assert context.choose_image_size(TrainConfig(data="x", strategy="fine-tune"), entry, data)[0] == 64


def test_write_splits_lists_every_image_with_its_split_and_status(tmp_path):
    data = _data(write_image_folder(tmp_path / "d", n_per_class=5))
    keys = [f"k{i}" if i % 3 else None for i in range(len(data.samples))]
    (tmp_path / "splits.csv").write_text(outputs.splits_csv(data, Extraction(keys=keys)))
    with open(tmp_path / "splits.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [s.path for s in data.samples]
    assert [r["class"] for r in rows] == [data.classes[s.label] for s in data.samples]
    assert [r["split"] for r in rows] == [s.split for s in data.samples]
    assert [r["status"] for r in rows] == ["ok" if k else "skipped" for k in keys]
    assert {r["split"] for r in rows} <= {"train", "val", "test"}


def test_check_skipped_lists_every_unused_file_and_strict_stops(tmp_path):
    data = _data(write_image_folder(tmp_path / "d", n_per_class=3))
    data.ignored.append({"path": "notes.txt", "reason": "not an image file"})
    ext = Extraction(keys=[None] + ["k"] * (len(data.samples) - 1), failures={data.samples[0].path: "damaged"})
    bad_rows = [{"path": "row 3", "reason": "no label"}]
    skipped = context.check_skipped(TrainConfig(data="x"), bad_rows, data, ext)
    assert [s["path"] for s in skipped] == ["row 3", "notes.txt", data.samples[0].path]
    with pytest.raises(DataError, match=r"--strict: 2 unusable image files, nothing trained \(1 other file, not "
                                        r"images by extension, skipped as always\).*\n  row 3: no label") as refused:
        context.check_skipped(TrainConfig(data="x", strict=True), bad_rows, data, ext)
    assert "notes.txt" not in str(refused.value)  # not an image by its extension: skipped, never refused
    clean = Extraction(keys=["k"] * len(data.samples))
    data.ignored.clear()
    assert context.check_skipped(TrainConfig(data="x", strict=True), [], data, clean) == []


def _features(data, readable):
    samples = [s for s, ok in zip(data.samples, readable) if ok]
    split = np.array([s.split for s in samples])
    return context.Features(ext=None, cache=None, classes=data.classes, paths=[s.path for s in data.samples],
                             samples=samples, X=np.zeros((len(samples), 2)),
                             y=np.array([s.label for s in samples]), tr=split == "train", va=split == "val",
                             te=split == "test")


def test_check_training_classes_warns_about_a_lost_class_and_refuses_one_left(tmp_path, caplog):
    data = _data(write_image_folder(tmp_path / "d", n_per_class=6, classes=("a", "b", "c")))
    context.check_training_classes(data, _features(data, [True] * len(data.samples)))  # all fine: silent
    no_c = [data.classes[s.label] != "c" or s.split != "train" for s in data.samples]
    with caplog.at_level(logging.WARNING, logger="headstart"):
        context.check_training_classes(data, _features(data, no_c))
    assert "classes ['c'] have no readable training image left" in caplog.text
    only_a = [data.classes[s.label] == "a" or s.split != "train" for s in data.samples]
    with pytest.raises(DataError, match="fewer than two classes"):
        context.check_training_classes(data, _features(data, only_a))


def test_load_run_data_refuses_a_single_class(tmp_path):
    root = write_image_folder(tmp_path / "d", n_per_class=3, classes=("only",))
    with pytest.raises(DataError, match="single class \\(only\\).*at least two"):
        context.load_run_data(configure(TrainConfig(data=str(root))))


def test_resolve_backbone_fills_in_and_checks_unfreeze():
    cfg = configure(TrainConfig(data="x", strategy="fine-tune"))
    entry = training.resolve_backbone(cfg)
    assert cfg.finetune.unfreeze == min(entry.default_unfreeze, len(entry.blocks))
    cfg = configure(TrainConfig(data="x", strategy="fine-tune", finetune={"unfreeze": 99}))
    with pytest.raises(HeadstartError, match=r"--unfreeze 99: mobilenet_v2 has \d+ blocks"):
        training.resolve_backbone(cfg)
    cfg = configure(TrainConfig(data="x", strategy="scratch"))
    assert training.resolve_backbone(cfg).name == "small_cnn" and cfg.finetune.unfreeze == "all"
    cfg = configure(TrainConfig(data="x", strategy="feature-extraction"))
    training.resolve_backbone(cfg)
    assert cfg.finetune is None


def test_a_fifo_named_like_an_image_does_not_hang_the_size_rule(tmp_path):
    root = write_image_folder(tmp_path / "d", n_per_class=3, size=(20, 20))
    data = _data(root)
    os.remove(data.samples[0].path)
    os.mkfifo(data.samples[0].path)
    assert training.auto_image_size(data, 224)[0] == 96  # the FIFO is passed over, the rest measured
    Image.open(data.samples[1].path).close()
