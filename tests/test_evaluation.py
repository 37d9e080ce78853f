import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headstart.reports.metrics import compute_metrics, worst_errors
from headstart.reports.plots import plot_confusion_matrix, plot_training_curve, plot_worst_errors
from headstart.reports.tables import format_report, write_report_markdown

CLASSES = ["cat", "dog", "fox", "owl"]
# Predictions (argmax): cat, dog, dog, dog, fox, cat -> 4 of 6 right.
Y_TRUE = np.array([0, 0, 1, 1, 2, 3])
PROBA = np.array(
    [
        [0.70, 0.10, 0.10, 0.10],  # cat -> cat
        [0.40, 0.50, 0.05, 0.05],  # cat -> dog, true class 2nd: inside top-3
        [0.10, 0.80, 0.05, 0.05],  # dog -> dog
        [0.20, 0.60, 0.10, 0.10],  # dog -> dog
        [0.10, 0.10, 0.70, 0.10],  # fox -> fox
        [0.50, 0.30, 0.15, 0.05],  # owl -> cat, true class last: outside top-3
    ]
)


@pytest.fixture
def metrics():
    return compute_metrics(Y_TRUE, PROBA, CLASSES)


def _assert_plain_json(obj):
    # numpy scalars would pass json.dumps for floats but not ints; require builtins.
    if isinstance(obj, dict):
        for key, value in obj.items():
            assert type(key) is str
            _assert_plain_json(value)
    elif isinstance(obj, list):
        for value in obj:
            _assert_plain_json(value)
    else:
        assert obj is None or type(obj) in (str, int, float, bool), type(obj)


def _assert_png(path: Path):
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] > 0 and image.size[1] > 0
    assert not list(path.parent.glob("*.tmp"))


# --------------------------------------------------------------------------- metrics


def test_metrics_match_hand_computation(metrics):
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    # Recalls: cat 1/2, dog 2/2, fox 1/1, owl 0/1.
    assert metrics["balanced_accuracy"] == pytest.approx((0.5 + 1 + 1 + 0) / 4)
    # F1: cat 0.5, dog 2*(2/3)*1/(2/3+1) = 0.8, fox 1, owl 0.
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.8 + 1 + 0) / 4)
    # Only k=3 is informative with 4 classes (k=1 is accuracy, k=5 >= n_classes).
    assert metrics["top_k_accuracy"] == {"3": pytest.approx(5 / 6)}
    assert metrics["n_images"] == 6
    assert metrics["classes"] == CLASSES
    assert metrics["confusion_matrix"] == [
        [1, 1, 0, 0],
        [0, 2, 0, 0],
        [0, 0, 1, 0],
        [1, 0, 0, 0],
    ]


def test_per_class_rows(metrics):
    by_class = {row["class"]: row for row in metrics["per_class"]}
    assert list(by_class) == CLASSES
    assert by_class["dog"]["precision"] == pytest.approx(2 / 3)
    assert by_class["dog"]["recall"] == pytest.approx(1.0)
    assert by_class["dog"]["f1"] == pytest.approx(0.8)
    # owl is never predicted: precision is 0/0, reported as 0 rather than NaN.
    assert by_class["owl"] == {"class": "owl", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert [row["support"] for row in metrics["per_class"]] == [2, 2, 1, 1]


def test_metrics_are_plain_json(metrics):
    _assert_plain_json(metrics)
    assert json.loads(json.dumps(metrics)) == metrics


def test_subset_of_classes_keeps_every_class():
    classes = ["a", "b", "c", "d", "e"]
    y_true = np.array([0, 0, 2, 2])
    proba = np.full((4, 5), 0.1)
    proba[[0, 1, 2, 3], [0, 1, 2, 2]] = 0.6  # second image predicted as b, absent from y_true
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sklearn's "classes not in y_true" must not leak
        m = compute_metrics(y_true, proba, classes)

    assert m["accuracy"] == pytest.approx(3 / 4)
    # Mean recall over the classes present in y_true only: a 1/2, c 2/2.
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    # Macro-F1 likewise: a 1/(1 + 0.5 * (0 + 1)) = 2/3, c 2 * 1 * 1 / 2 = 1; b, d and e have no images.
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["classes_without_test_images"] == ["b", "d", "e"]
    assert [row["class"] for row in m["per_class"]] == classes
    assert [row["support"] for row in m["per_class"]] == [2, 0, 2, 0, 0]
    # b was predicted once, wrongly, but with no images of it there is nothing to score: null, not 0.
    assert m["per_class"][1] == {"class": "b", "precision": None, "recall": None, "f1": None, "support": 0}
    assert len(m["confusion_matrix"]) == 5
    assert all(len(row) == 5 for row in m["confusion_matrix"])
    assert sum(map(sum, m["confusion_matrix"])) == 4
    assert set(m["top_k_accuracy"]) == {"3"}


def test_a_class_without_test_images_is_left_out_of_macro_f1_and_says_so(tmp_path):
    """Issue 29: a class with no test images counted as F1 0 pulled macro-F1 down (0.7444 where the classes
    with test images averaged 0.93). The mean covers the classes with images, every report names the rest,
    and no report shows 0.0000 for them."""
    with_owl = compute_metrics(Y_TRUE, PROBA, CLASSES)
    keep = Y_TRUE != 3  # the owl image gone: owl is a class of the model with no test image
    m = compute_metrics(Y_TRUE[keep], PROBA[keep], CLASSES)
    f1 = {row["class"]: row["f1"] for row in m["per_class"]}
    assert f1["owl"] is None and m["classes_without_test_images"] == ["owl"]
    assert m["macro_f1"] == pytest.approx(np.mean([f1[c] for c in ("cat", "dog", "fox")]))
    assert m["macro_f1"] > with_owl["macro_f1"]  # the old mean, over four classes, counted owl as 0
    assert with_owl["classes_without_test_images"] == []

    text = format_report(m)
    assert "mean over the 3 of 4 classes with test images; no test images: owl" in text
    owl_row = next(line for line in text.splitlines() if line.startswith("owl "))
    assert "no test images" in owl_row and "0.0000" not in owl_row
    write_report_markdown(m, tmp_path / "r.md")
    md = (tmp_path / "r.md").read_text()
    assert "| owl | no test images | - | - | 0 |" in md
    assert "| cat | 1.0000 | 0.5000 | 0.6667 | 2 |" in md  # a present class keeps its numbers


def test_confusion_matrix_sums_to_n():
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.ones(6), size=50)
    m = compute_metrics(rng.integers(0, 6, size=50), proba, list("abcdef"))
    assert sum(map(sum, m["confusion_matrix"])) == 50
    assert set(m["top_k_accuracy"]) == {"3", "5"}


def test_binary_has_no_top_k():
    m = compute_metrics([0, 1], [[0.9, 0.1], [0.2, 0.8]], ["no", "yes"])
    assert m["top_k_accuracy"] == {}
    assert m["accuracy"] == 1.0


def test_skipped_passes_through_as_json():
    skipped = [{"path": Path("data/x.jpg"), "reason": "cannot decode"}]
    m = compute_metrics(Y_TRUE, PROBA, CLASSES, skipped=skipped)
    assert m["skipped"] == [{"path": str(Path("data/x.jpg")), "reason": "cannot decode"}]
    json.dumps(m)


def test_empty_set_raises():
    with pytest.raises(ValueError, match="empty evaluation set"):
        compute_metrics(np.array([], dtype=int), np.zeros((0, 4)), CLASSES)


@pytest.mark.parametrize(
    "y_true, proba, match",
    [
        (Y_TRUE, PROBA[:, :3], "shape"),
        (Y_TRUE[:5], PROBA, "shape"),
        (np.array([0, 0, 1, 1, 2, 4]), PROBA, "outside"),
        (Y_TRUE.astype(float), PROBA, "integer"),
        (Y_TRUE, np.where(PROBA > 0.6, np.nan, PROBA), "NaN"),
    ],
)
def test_bad_inputs_raise(y_true, proba, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(y_true, proba, CLASSES)


# --------------------------------------------------------------------------- text reports


def test_format_report_contents(metrics):
    report = format_report(metrics)
    for name in CLASSES:
        assert name in report
    assert "0.6667" in report  # accuracy
    assert "0.6250" in report  # balanced accuracy
    assert "top-3 accuracy" in report
    assert "\x1b" not in report  # no colour codes in logs


def test_format_report_fits_120_columns_for_10_long_names():
    classes = [f"very_long_class_name_number_{i}" for i in range(10)]
    rng = np.random.default_rng(1)
    m = compute_metrics(rng.integers(0, 10, size=200), rng.dirichlet(np.ones(10), size=200), classes)
    report = format_report(m)
    matrix = report.split("confusion matrix")[1]
    assert max(len(line) for line in matrix.splitlines()) <= 120
    for name in classes:
        assert name in report  # the per-class table keeps full names


def test_markdown_report(tmp_path, metrics):
    metrics["skipped"] = [{"path": "bad.jpg", "reason": "truncated file"}]
    out = tmp_path / "report.md"
    write_report_markdown(metrics, out, title="Test run")
    text = out.read_text()
    assert text.startswith("# Test run")
    for heading in ("## Summary", "## Per class", "## Confusion matrix", "## Skipped images"):
        assert heading in text
    assert "| dog | 0.6667 | 1.0000 | 0.8000 | 2 |" in text
    assert "| owl | 1 | 0 | 0 | 0 |" in text
    assert "bad.jpg" in text
    assert not list(tmp_path.glob("*.tmp"))


# --------------------------------------------------------------------------- plots


@pytest.mark.parametrize("normalize", [True, False])
def test_plot_confusion_matrix(tmp_path, metrics, normalize):
    out = tmp_path / "plots" / "cm.png"
    plot_confusion_matrix(metrics["confusion_matrix"], CLASSES, out, normalize=normalize)
    _assert_png(out)


def test_plot_confusion_matrix_with_empty_row(tmp_path):
    out = tmp_path / "cm.png"
    plot_confusion_matrix(np.array([[2, 0], [0, 0]]), ["a", "b"], out)
    _assert_png(out)


def test_confusion_matrix_of_many_classes_stays_bounded(tmp_path, monkeypatch):
    """300 classes drew a 167-inch figure with 90,000 counts (at 100 classes 1.1 GB resident and tens of
    seconds); the figure is capped at 24 inches and leaves the counts and names out past its limits. What made
    it slow is counted (texts and tick labels drawn), not timed: a time limit fails on a busy machine."""
    from PIL import Image

    from headstart.reports import plots

    drawn = []
    real_save = plots.save_png
    monkeypatch.setattr(plots, "save_png", lambda fig, path: (drawn.append(fig), real_save(fig, path))[1])
    n = 300
    rng = np.random.default_rng(0)
    plot_confusion_matrix(rng.integers(0, 5, size=(n, n)), [f"class{i}" for i in range(n)], tmp_path / "cm.png")
    with Image.open(tmp_path / "cm.png") as im:
        assert max(im.size) <= 2_500
    ax = drawn[0].axes[0]
    labels = [t.get_text() for t in (*ax.get_xticklabels(), *ax.get_yticklabels())]
    assert len(ax.texts) == 0 and not any(label.startswith("class") for label in labels), labels[:5]
    plot_confusion_matrix(np.eye(3, dtype=int), ["a", "b", "c"], tmp_path / "small.png")  # below the limits: all
    small = drawn[1].axes[0]
    assert len(small.texts) == 9 and [t.get_text() for t in small.get_xticklabels()] == ["a", "b", "c"]


def test_plot_confusion_matrix_shape_mismatch(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        plot_confusion_matrix(np.eye(3, dtype=int), ["a", "b"], tmp_path / "cm.png")


@pytest.mark.parametrize("with_accuracy", [True, False])
def test_plot_training_curve(tmp_path, with_accuracy):
    history = {"epoch": [1, 2, 3], "train_loss": [1.0, 0.6, 0.4], "val_loss": [1.1, 0.7, 0.8]}
    if with_accuracy:
        history["val_accuracy"] = [0.5, 0.7, 0.65]
    history["best_epoch"] = 2
    out = tmp_path / "curve.png"
    plot_training_curve(history, out)
    _assert_png(out)


def test_plot_training_curve_rejects_ragged_history(tmp_path):
    with pytest.raises(ValueError, match="val_loss"):
        plot_training_curve({"epoch": [1, 2], "train_loss": [1, 2], "val_loss": [1]}, tmp_path / "c.png")


def _make_images(folder: Path, count: int) -> list[Path]:
    paths = []
    for i in range(count):
        path = folder / f"img{i}.png"
        Image.new("RGB", (12, 8), color=(20 * i, 100, 200)).save(path)
        paths.append(path)
    return paths


def test_plot_worst_errors_picks_most_confident_mistakes(tmp_path):
    paths = _make_images(tmp_path, 6)
    y_true = np.array([0, 0, 1, 1, 2, 2])
    proba = np.array(
        [
            [0.9, 0.05, 0.05],  # right
            [0.2, 0.7, 0.1],  # wrong, p=0.7
            [0.05, 0.05, 0.9],  # wrong, p=0.9 -> worst
            [0.1, 0.8, 0.1],  # right
            [0.6, 0.1, 0.3],  # wrong, p=0.6
            [0.1, 0.1, 0.8],  # right
        ]
    )
    loaded = []

    def load(p):
        loaded.append(p)
        return Image.open(p)

    out = tmp_path / "out" / "errors.png"
    chosen = plot_worst_errors(paths, y_true, proba, ["a", "b", "c"], out, load, n=2)
    assert chosen == [
        (paths[2], "b", "c", pytest.approx(0.9)),
        (paths[1], "a", "b", pytest.approx(0.7)),
    ]
    assert loaded == [paths[2], paths[1]]
    _assert_png(out)

    all_errors = worst_errors(paths, y_true, proba, ["a", "b", "c"])
    assert [c[0] for c in all_errors] == [paths[2], paths[1], paths[4]]


def test_plot_worst_errors_without_mistakes(tmp_path):
    paths = _make_images(tmp_path, 2)
    out = tmp_path / "errors.png"

    def never(p):
        raise AssertionError("no image should be loaded")

    chosen = plot_worst_errors(paths, [0, 1], np.eye(2), ["a", "b"], out, never)
    assert chosen == []
    _assert_png(out)


def test_worst_errors_titles_name_the_files(tmp_path, monkeypatch):
    from headstart.reports import plots

    paths = _make_images(tmp_path, 3)
    figures = []
    monkeypatch.setattr(plots, "save_png", lambda fig, path: figures.append(fig))
    proba = np.array([[0.2, 0.8], [0.9, 0.1], [0.3, 0.7]])
    plot_worst_errors(paths, [0, 1, 0], proba, ["a", "b"], tmp_path / "e.png", Image.open, root=tmp_path)
    titles = [ax.get_title() for ax in figures[0].axes]
    assert len(titles) == 3  # most confident first, each by its path in the data folder
    assert [t.splitlines()[0] for t in titles] == [os.path.relpath(paths[i], tmp_path) for i in (1, 0, 2)]
    plot_worst_errors(paths, [0, 1, 0], proba, ["a", "b"], tmp_path / "e.png", Image.open)  # no data folder given
    titles = [ax.get_title().splitlines()[0] for ax in figures[1].axes]
    assert all(t.endswith(os.sep + Path(paths[i]).name) for t, i in zip(titles, (1, 0, 2))), titles


@pytest.mark.parametrize("correct, n, low, high", [
    (19, 20, 0.763869, 0.991119),  # the roots of (k/n - p)^2 = z^2 p (1 - p) / n, solved with numpy.roots
    (0, 10, 0.0, 0.277533),
    (10, 10, 0.722467, 1.0),
    (8812, 10000, 0.874712, 0.887396),
])
def test_wilson_interval(correct, n, low, high):
    from headstart.reports.metrics import wilson_interval

    assert wilson_interval(correct, n) == pytest.approx([low, high], abs=2e-6)


def test_metrics_carry_the_accuracy_interval(metrics):
    from headstart.reports.metrics import wilson_interval

    correct = round(metrics["accuracy"] * metrics["n_images"])
    assert metrics["accuracy_ci95"] == wilson_interval(correct, metrics["n_images"])
    assert "accuracy, 95% interval" in format_report(metrics)


# --------------------------------------------------------------------------- a class with no test images, end to end


def _folder_with_a_class_split_2_1_0(root: Path) -> Path:
    """train/val/test folders: three classes with images in every split, `tiny` (3 images: 2 train, 1 val,
    0 test) and `wee` (2 train, 0 val, 1 test)."""
    from conftest import write_image_folder

    classes = ("ant", "bee", "cow", "tiny", "wee")
    for split, n, seed in (("train", 8, 0), ("val", 3, 1), ("test", 4, 2)):
        write_image_folder(root / split, n_per_class=n, classes=classes, size=(12, 10), seed=seed)
    for split, keep in (("train", {"tiny": 2, "wee": 2}), ("val", {"tiny": 1, "wee": 0}), ("test", {"tiny": 0, "wee": 1})):
        for name, k in keep.items():
            for f in sorted((root / split / name).iterdir())[k:]:
                f.unlink()
    return root


def test_a_class_with_no_test_images_train_evaluate_and_the_reports(tmp_path):
    import headstart
    from test_cli import run_cli

    data = _folder_with_a_class_split_2_1_0(tmp_path / "data")
    run = tmp_path / "run"
    code, stdout, stderr = run_cli("train", data, "--strategy", "feature-extraction", "--backbone", "small_cnn",
                                   "--weights", "none", "--image-size", "32", "--workers", "0", "--engine", "torch",
                                   "--cache-dir", "none", "--out", run, "--json")
    assert code == 0, stderr
    # train names the class and its counts, for the test split and for validation
    assert "class without test images: tiny (train 2, val 1, test 0 readable images)" in stderr
    assert "class without validation images: wee (train 2, val 0, test 1 readable images)" in stderr

    test = json.loads((run / "metrics.json").read_text())["test"]
    assert json.loads(stdout)["test"] == test
    scored = [row["f1"] for row in test["per_class"] if row["class"] != "tiny"]
    assert test["classes_without_test_images"] == ["tiny"]
    assert test["macro_f1"] == pytest.approx(np.mean(scored))  # the mean over the classes with test images
    assert next(r for r in test["per_class"] if r["class"] == "tiny") == {
        "class": "tiny", "precision": None, "recall": None, "f1": None, "support": 0}

    # evaluate, through the API and the command (JSON and text), says the same
    evaluated = headstart.evaluate(run, cache_dir="none")
    assert evaluated["macro_f1"] == test["macro_f1"]
    assert evaluated["classes_without_test_images"] == ["tiny"]
    code, stdout, stderr = run_cli("evaluate", run, "--json", "--cache-dir", "none")
    assert code == 0, stderr
    assert json.loads(stdout)["macro_f1"] == test["macro_f1"]
    assert "no images of classes ['tiny']" in stderr and "left out of macro-F1" in stderr
    assert "no test images: tiny" in format_report(evaluated)  # evaluate's text output

    # both reports show the class as having no test images, not as 0
    md = (run / "report.md").read_text()
    assert "| tiny | no test images | - | - | 0 |" in md and "no test images: tiny" in md
    page = (run / "report.html").read_text()
    per_class = page[page.index("<h3>Per class</h3>"):]  # (the images-per-class table names tiny first)
    row = per_class[per_class.index("<td>tiny</td>"):][:300]
    assert "no test images" in row and "0.0000" not in row.split("</tr>")[0]
