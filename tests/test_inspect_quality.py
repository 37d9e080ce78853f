"""The planted-problem benchmark's measure of wrong pairs (benchmarks/inspect_quality.py): a reported pair that
was not planted is wrong unless the data already held that picture twice, checked on the pixels."""

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
from PIL import Image

SPEC = importlib.util.spec_from_file_location(
    "inspect_quality", Path(__file__).resolve().parents[1] / "benchmarks" / "inspect_quality.py")
iq = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(iq)


def test_score_counts_pictures_the_data_holds_twice_as_duplicates_not_wrong(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "noisy"
    pic = rng.integers(0, 256, (28, 28)).astype(np.uint8)
    other = rng.integers(0, 256, (28, 28)).astype(np.uint8)
    files = {"test/a/1.png": pic, "train/a/2.png": np.clip(pic.astype(int) + 2, 0, 255).astype(np.uint8),
             "train/a/3.png": other, "train/a/copy_000.png": pic, "test/a/4.png": pic}
    for f, arr in files.items():
        (data / f).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(data / f)
    truth = {"moved": [], "strays": [], "copies": [{"test": "test/a/1.png", "copy": "train/a/copy_000.png",
                                                    "how": "jpeg"}]}
    (tmp_path / "noisy.truth.json").write_text(json.dumps(truth))
    rows = [("test/a/1.png", "train/a/copy_000.png"),  # planted
            ("test/a/1.png", "train/a/2.png"),  # the same picture, 2 grey levels apart: already in the data
            ("test/a/4.png", "train/a/copy_000.png"),  # a copy of 1.png, and 4.png is 1.png again
            ("test/a/1.png", "train/a/3.png")]  # another picture: wrong
    with open(tmp_path / "issues.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "split", "kind", "score", "given_label", "suggested_label",
                                          "partner"])
        w.writeheader()
        for p, q in rows:
            w.writerow({"path": p, "split": "test", "kind": "leak", "score": 1, "given_label": "a",
                        "suggested_label": "", "partner": q})
    got = iq.score(tmp_path / "noisy.truth.json", tmp_path / "issues.csv")["copies"]
    assert got["found"] == 1 and got["pair_rows"] == 4
    assert got["pairs_not_planted"] == 3 and got["duplicates_already_in_the_data"] == 2
    assert got["wrong_pairs"] == 1 and got["share_wrong"] == 0.25


def test_other_variants_change_the_picture_as_named():
    rng = np.random.default_rng(1)
    im = Image.fromarray(np.full((28, 28), 100, np.uint8))
    assert iq._copy_variant(im, "crop4", rng)[0].size == (26, 26)
    bright, ext = iq._copy_variant(im, "bright+jpeg60", rng)
    assert ext == ".jpg" and abs(int(np.asarray(bright)[0, 0]) - 100) in (10, 15)
