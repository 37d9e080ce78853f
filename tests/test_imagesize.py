"""imagesize.py: the `--image-size auto` rule per strategy and backbone size, and what a run records."""

from __future__ import annotations

import json

import pytest

import headstart
from conftest import write_image_folder
from headstart.data.folders import ImageData, Sample, load_data
from headstart.data.image_size import FE_SHARE, RULE, size_for
from headstart.strategies import auto_image_size, get_strategy


def sizing_strategy(data, strategy):
    return get_strategy(strategy).sizing(data)

SIDES = (8, 28, 64, 200, 400)


@pytest.mark.parametrize("default, fe, ft", [
    # feature extraction: at least 0.7x the backbone's size; fine-tuning: at most 4x, a multiple of 32, >= 64
    (224, (160, 160, 224, 224, 224), (64, 128, 224, 224, 224)),
    (240, (192, 192, 240, 240, 240), (64, 128, 240, 240, 240)),  # EfficientNet-Lite1's input size
    (32, (32, 32, 32, 32, 32), (32, 32, 32, 32, 32)),  # the scratch baseline's small CNN: its native size
])
def test_size_for_each_strategy_relative_to_the_backbone_size(default, fe, ft):
    assert tuple(size_for(s, default, "feature-extraction") for s in SIDES) == fe
    assert tuple(size_for(s, default, "fine-tune") for s in SIDES) == ft
    assert tuple(size_for(s, default, "scratch") for s in SIDES) == ft  # scratch keeps the fine-tuning rule
    assert FE_SHARE * default <= min(fe) or min(fe) == default


def _data(per_class_train: int, classes=("a", "b")) -> ImageData:
    samples = [Sample(path=f"/nowhere/{c}/{i}.png", rel=f"{c}/{i}.png", label=k, split=split)
               for k, c in enumerate(classes) for i, split in enumerate(["train"] * per_class_train + ["val", "test"])]
    return ImageData(root="/nowhere", classes=list(classes), samples=samples, layout="classes")


def test_auto_sizes_as_feature_extraction_only_when_that_choice_is_known_before_phase_1():
    assert sizing_strategy(_data(99), "auto")[0] == "feature-extraction"  # auto.MIN_PER_CLASS is 100
    assert "99 training images in the smallest class" in sizing_strategy(_data(99), "auto")[1]
    assert sizing_strategy(_data(100), "auto")[0] == "fine-tune"
    for strategy, rule in (("feature-extraction", "feature-extraction"), ("fine-tune", "fine-tune"),
                           ("scratch", "fine-tune")):
        assert sizing_strategy(_data(5), strategy)[0] == rule


def test_auto_image_size_reads_the_images_and_says_why(tmp_path):
    few = load_data(str(write_image_folder(tmp_path / "few", n_per_class=8, size=(28, 28))),
                    val_fraction=0.2, test_fraction=0.2)[0]
    size, reason = auto_image_size(few, 224, "feature-extraction")
    assert size == 160 and "median image side 28 px" in reason and "0.7x the backbone's 224 px" in reason
    assert auto_image_size(few, 224, "fine-tune")[0] == 128
    size, reason = auto_image_size(few, 224, "auto")  # under 100 training images per class
    assert size == 160 and "--strategy auto will extract features" in reason
    large = load_data(str(write_image_folder(tmp_path / "large", n_per_class=2, size=(400, 300))))[0]
    assert auto_image_size(large, 224, "feature-extraction") == (224, "backbone default 224 px (median image side "
                                                                      "300 px)")


@pytest.mark.slow  # 6.7 s at load 10
def test_a_run_records_the_size_its_reason_and_the_rule_and_image_size_overrides(tmp_path, one_torch_thread):
    data = write_image_folder(tmp_path / "data", n_per_class=4, size=(8, 8))
    common = dict(strategy="feature-extraction", backbone="mobilenet_v2", weights="none", workers=0,
                  cache_dir="none", engine="torch", precision="fp32", val_fraction=0.2, test_fraction=0.2)
    run = headstart.train(data, out=tmp_path / "auto", **common)
    config = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert config["image_size"] == run.config["image_size"] == 160
    assert config["image_size_reason"].startswith("160 px: median image side 8 px; --strategy feature-extraction")
    assert config["image_size_rule"] == RULE and "0.8772" in config["image_size_rule"]["measured"]
    asked = headstart.train(data, out=tmp_path / "asked", image_size=48, **common)
    assert (asked.config["image_size"], asked.config["image_size_reason"]) == (48, "asked for")
    assert asked.config["image_size_rule"] is None
