"""report.html and compare.html: what they hold, that user strings are escaped, that `headstart report` rebuilds
them byte for byte, and that headless Chromium renders them with no error and no request but the file itself.

One real run (Fashion-MNIST tiny, 32 px, MLP head so it has a training curve) on a copy of the data in which one
class is named with a `<script>` tag and another with bytes that are not UTF-8, one class has no test images, plus
two unusable files.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import headstart
from conftest import write_image_folder
from test_cli import run_cli

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"  # git-ignored
CHROMIUM = "/usr/bin/chromium"
SCRIPT_CLASS = "Bag<script>alert(1)"
LATIN1_CLASS = os.fsdecode(b"Sandal-caf\xe9")  # not UTF-8: arrives with a surrogate
BROKEN = os.fsdecode(b"broken-\xff.png")
NO_TEST = "Trouser"  # its test folder removed: a class the test split says nothing about


def shown(name: str) -> str:
    """How the page must show `name`: undecodable bytes as \\xNN, then HTML-escaped."""
    return html.escape(name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))


@pytest.fixture(scope="module")
def run(fmnist_tiny, tmp_path_factory, one_torch_thread) -> Path:
    base = tmp_path_factory.mktemp("report")
    data = base / "data"
    shutil.copytree(fmnist_tiny, data)
    for split in ("train", "test"):
        os.rename(data / split / "Bag", data / split / SCRIPT_CLASS)
        os.rename(data / split / "Sandal", data / split / LATIN1_CLASS)
    (data / "test" / "Coat" / BROKEN).write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    (data / "train" / "Shirt" / "notes.png").write_text("not an image\n")
    shutil.rmtree(data / "test" / NO_TEST)
    return headstart.train(data, strategy="feature-extraction", head="mlp", image_size=32, workers=0,
                           out=base / "run", cache_dir=base / "cache").run_dir


def test_report_html_holds_the_run(run):
    raw = (run / "report.html").read_bytes()
    page = raw.decode("utf-8")  # strict: no raw bytes of a non-UTF-8 name leak into the page
    config = json.loads((run / "config.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    test = metrics["test"]
    for fact in (str(run.parent / "data"), "train/val/test folders", "feature-extraction (asked: feature-extraction; "
                 "head mlp)", "mobilenet_v2", shown(config["weights"]["source"]), "32 px (asked for)",
                 f"{config['engine']['engine']}, {config['engine']['precision']} on cpu", "feature extraction",
                 "head training", f"{metrics['wall_seconds']:.1f} s"):
        assert fact in page, fact
    low, high = test["accuracy_ci95"]
    assert f"{test['accuracy']:.4f} (95% interval {low:.4f} - {high:.4f})" in page
    for row in (r for r in test["per_class"] if r["support"]):  # the per-class table; the class without test
        # images has its own test below
        assert (f"<td>{shown(row['class'])}</td><td class=\"n\">{row['precision']:.4f}</td>"
                f"<td class=\"n\">{row['recall']:.4f}</td>") in page, row["class"]
    cm = re.search(r'<table class="cm">(.*?)</table>', page, re.S).group(1)
    cells = [int(n) for n in re.findall(r"<td[^>]*>(\d+)</td>", cm)]
    assert cells == [n for row in test["confusion_matrix"] for n in row]
    assert '<img class="plot" alt="Training curve" src="data:image/png;base64,' in page  # the MLP's history
    assert '<a href="test_predictions.csv">' in page


def test_report_says_when_how_and_by_which_code_the_run_was_made(run):
    from datetime import datetime

    config = json.loads((run / "config.json").read_text())
    started = datetime.fromisoformat(config["started"])
    assert started.tzinfo is not None and started <= datetime.now().astimezone()
    # The commit of this checkout, asked of git here rather than of headstart; None from an installed wheel.
    src = Path(headstart.__file__).parent
    head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    tracked = subprocess.run(["git", "-C", str(src), "ls-files", "--error-unmatch", "__init__.py"],
                             capture_output=True).returncode == 0
    commit = config["versions"]["headstart_commit"]
    if head.returncode == 0 and tracked:
        assert commit in (head.stdout.strip(), head.stdout.strip() + " + changes")
    else:
        assert commit is None
    page = (run / "report.html").read_text(encoding="utf-8")
    md = (run / "report.md").read_text(encoding="utf-8", errors="surrogateescape")
    assert f"<th>date</th><td>{config['started'].replace('T', ' ')} (when the run started)</td>" in page
    assert f"| date | {config['started'].replace('T', ' ')} (when the run started) |" in md
    version = f"version {headstart.__version__}, commit {commit.split(' ')[0] if commit else 'none'}"
    assert version in page and version in md
    assert "headstart.train() from Python, in the process" in md  # trained through the API, in pytest's process


def test_an_older_run_says_what_it_did_not_record(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    config = json.loads((copy / "config.json").read_text())
    del config["started"], config["versions"]["headstart_commit"]
    config["command"] = ["/venv/bin/headstart", "train", "my photos", "--strategy", "feature-extraction"]
    (copy / "config.json").write_text(json.dumps(config))
    headstart.report(copy)
    md = (copy / "report.md").read_text(encoding="utf-8", errors="surrogateescape")
    assert "| date | not recorded (a run from before headstart recorded it) |" in md
    assert "commit not recorded (a run from before headstart recorded it)" in md
    assert "| command | headstart train 'my photos' --strategy feature-extraction |" in md


def test_report_counts_the_images_of_every_class_in_every_split(run):
    used: dict[str, dict[str, int]] = {}
    with open(run / "splits.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        for r in csv.DictReader(f):
            used.setdefault(r["class"], {"train": 0, "val": 0, "test": 0})[r["split"]] += r["status"] == "ok"
    found = json.loads((run / "config.json").read_text())["data_summary"]["per_class"]
    assert used[NO_TEST]["test"] == 0 and sum(used["Shirt"].values()) == sum(found["Shirt"].values()) - 1  # notes.png
    page = (run / "report.html").read_text(encoding="utf-8")
    md = (run / "report.md").read_text(encoding="utf-8", errors="surrogateescape")
    table = re.search(r'<h3 id="images">Images per class</h3><table[^>]*>(.*?)</table>', page, re.S).group(1)
    rows = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table)[1:]]
    expected = [[shown(c), *(str(n[k]) if n[k] == found[c][k] else f"{n[k]} of {found[c][k]}"
                             for k in ("train", "val", "test"))] for c, n in used.items()]
    assert sorted(rows) == sorted(expected)
    assert f"| {NO_TEST} | {used[NO_TEST]['train']} | {used[NO_TEST]['val']} | 0 |" in md
    assert f"No test images: {NO_TEST} (the test scores say nothing about them)." in md
    assert f"<p>No test images: {NO_TEST} (the test scores say nothing about them).</p>" in page


def test_a_class_without_test_images_reads_no_test_images_not_zeros(run):
    metrics = json.loads((run / "metrics.json").read_text())
    row = next(r for r in metrics["test"]["per_class"] if r["class"] == NO_TEST)
    assert row["support"] == 0
    page = (run / "report.html").read_text(encoding="utf-8")
    assert f'<tr><td>{NO_TEST}</td><td class="none" colspan="3">no test images</td><td class="n">0</td></tr>' in page
    md = (run / "report.md").read_text(encoding="utf-8", errors="surrogateescape")
    assert f"| {NO_TEST} | no test images | - | - | 0 |" in md
    text = (run / "report.txt").read_text(encoding="utf-8", errors="surrogateescape")
    line = next(line for line in text.splitlines() if line.startswith(NO_TEST + " "))
    assert "no test images" in line and "0.0000" not in line


def test_shown_path_is_relative_to_the_data_folder_only_inside_it():
    from headstart.reports.plots import shown_path

    assert shown_path("/d/photos/cats/IMG_1056.jpg", "/d/photos") == os.path.join("cats", "IMG_1056.jpg")
    assert shown_path("/d/photos2/IMG_1056.jpg", "/d/photos") == "/d/photos2/IMG_1056.jpg"  # a sibling, not inside
    assert shown_path("/elsewhere/IMG_1056.jpg", "/d/photos") == "/elsewhere/IMG_1056.jpg"  # a labels CSV's image
    assert shown_path("/d/photos/IMG_1056.jpg", None) == "/d/photos/IMG_1056.jpg"


def test_report_shows_the_worst_errors_as_thumbnails_with_their_file_names(run):
    page = (run / "report.html").read_text(encoding="utf-8")
    root = json.loads((run / "config.json").read_text())["data_summary"]["root"]
    with open(run / "test_predictions.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        wrong = [r for r in csv.DictReader(f) if r["correct"] == "0"]
    assert wrong, "the tiny run made no mistake to show"
    wrong.sort(key=lambda r: -float(r["probability"]))
    figures = re.findall(r"<figure>(.*?)</figure>", page, re.S)
    assert len(figures) == min(16, len(wrong))
    assert f"{len(figures)} of the {len(wrong)} wrong predictions" in page
    for fig, r in zip(figures, wrong):
        assert f"<b>{shown(os.path.relpath(r['path'], root))}</b>" in fig
        assert (f"true: {shown(r['true'])}<br>predicted: {shown(r['predicted'])} "
                f'<span class="p">(p={float(r["probability"]):.2f})</span>') in fig
        assert re.search(r'<img alt="[^"]+" src="data:image/png;base64,[A-Za-z0-9+/=]+">', fig)


IMG = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


def _png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    assert image.format == "PNG"
    image.load()
    return image


def test_each_worst_error_shows_the_maps_of_the_predicted_and_the_true_class(run):
    """Beside each mistake's image, two overlays: the map of the class the model predicted and of the true class,
    as Model.explain_classes draws them (this run's MLP head: Grad-CAM), at the thumbnail's size."""
    from headstart.data.images import load_image
    from headstart.heatmaps.overlay import thumbnail

    page = (run / "report.html").read_text(encoding="utf-8")
    root = json.loads((run / "config.json").read_text())["data_summary"]["root"]
    with open(run / "test_predictions.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        wrong = sorted((r for r in csv.DictReader(f) if r["correct"] == "0"), key=lambda r: -float(r["probability"]))
    figures = re.findall(r"<figure>(.*?)</figure>", page, re.S)
    assert figures and '<div class="grid maps">' in page and "No heatmaps" not in page
    model = headstart.load(run)
    explained = model.explain_classes([r["path"] for r in wrong[:len(figures)]],
                                      [[r["predicted"], r["true"]] for r in wrong[:len(figures)]],
                                      engine="torch", device="cpu", precision="fp32", cache_dir="none")
    for fig, r, (predicted, true) in zip(figures, wrong, explained):
        name = shown(os.path.relpath(r["path"], root))
        images = IMG.findall(fig)
        assert [alt for alt, _ in images] == [name, f"{name}: map of {shown(r['predicted'])}",
                                              f"{name}: map of {shown(r['true'])}"]
        assert "map: predicted" in fig and "map: true" in fig
        plain, *overlays = [_png(b64) for _, b64 in images]
        small = load_image(r["path"], min_side=96)
        small.thumbnail((96, 96))
        assert plain.size == small.size and all(o.size == small.size for o in overlays)
        assert not np.allclose(np.nan_to_num(predicted.map), np.nan_to_num(true.map))  # two classes, two maps
        for overlay, e in zip(overlays, (predicted, true)):
            want = np.asarray(thumbnail(small, e.map, 96), np.int16)
            assert np.abs(np.asarray(overlay.convert("RGB"), np.int16) - want).max() <= 2  # float noise only
            assert np.abs(np.asarray(overlay.convert("RGB"), np.int16)
                          - np.asarray(small.convert("RGB"), np.int16)).max() > 20  # a map drawn over the image


def test_a_run_whose_model_is_gone_still_gets_its_report_saying_why_in_one_line(run, tmp_path):
    from headstart.reports.html import write_reports

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "model" / "model.safetensors").unlink()
    write_reports(copy)
    page = (copy / "report.html").read_text(encoding="utf-8")
    assert len(re.findall(r"<p class=\"muted\">No heatmaps: the run&#x27;s model could not be loaded \(.+?\)\.</p>",
                          page)) == 1
    figures = re.findall(r"<figure>(.*?)</figure>", page, re.S)
    assert figures and all(len(IMG.findall(fig)) == 1 for fig in figures)  # the thumbnails, without maps
    assert '<div class="grid">' in page


def test_one_file_name_in_four_folders_is_four_captions(run, tmp_path):
    """The four most confident mistakes made IMG_1056.png, each in another class folder: each caption names its
    folder, in the page and in worst_errors.png's titles."""
    from headstart.data.images import load_image
    from headstart.reports.html import write_reports
    from headstart.reports.plots import plot_worst_errors

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    text = (copy / "test_predictions.csv").read_text(encoding="utf-8", errors="surrogateescape")
    rows = list(csv.DictReader(text.splitlines()))
    worst = sorted((r for r in rows if r["correct"] == "0"), key=lambda r: -float(r["probability"]))[:4]
    assert len(worst) == 4, "the tiny run made fewer than four mistakes"
    data = tmp_path / "data"
    renamed = []
    for i, r in enumerate(worst):
        new = data / f"folder{i}" / "IMG_1056.png"
        new.parent.mkdir(parents=True)
        shutil.copyfile(r["path"], new)
        text = text.replace(r["path"], str(new))
        renamed.append(new)
    (copy / "test_predictions.csv").write_bytes(text.encode("utf-8", "surrogateescape"))
    config = json.loads((copy / "config.json").read_text())
    config["data_summary"]["root"] = str(data)
    (copy / "config.json").write_text(json.dumps(config))
    write_reports(copy)
    captions = re.findall(r"<figcaption><b>(.*?)</b>", (copy / "report.html").read_text(encoding="utf-8"))
    assert captions[:4] == [f"folder{i}{os.sep}IMG_1056.png" for i in range(4)]

    titles = []  # the PNG's: the titles matplotlib drew, caught on their way into the figure
    from matplotlib.axes import Axes

    real = Axes.set_title
    try:
        Axes.set_title = lambda self, label, *a, **kw: (titles.append(label), real(self, label, *a, **kw))[1]
        plot_worst_errors(renamed, [0, 0, 0, 0], np.tile([0.1, 0.9], (4, 1)), ["a", "b"], tmp_path / "w.png",
                          load_image, root=data)
    finally:
        Axes.set_title = real
    assert [t.splitlines()[0] for t in titles] == [f"folder{i}{os.sep}IMG_1056.png" for i in range(4)]


def test_user_strings_are_escaped_and_skipped_files_listed_with_reasons(run):
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "<script" not in page.lower()  # the class name's tag is text, not a tag
    assert "Bag&lt;script&gt;alert(1)" in page
    assert "Sandal-caf\\xe9" in page  # the undecodable byte, shown as an escape
    skipped = {Path(s["path"]).name: s["reason"] for s in json.loads((run / "skipped.json").read_text())}
    assert set(skipped) == {BROKEN, "notes.png"}
    for name, reason in skipped.items():
        assert shown(name) in page and shown(reason) in page
    assert "broken-\\xff.png" in page


def test_headstart_report_rebuilds_the_same_files(run, tmp_path):
    before = {f: (run / f).read_bytes() for f in ("report.md", "report.html")}
    for f in before:
        (run / f).unlink()
    code, stdout, stderr = run_cli("report", run)
    assert code == 0, stderr
    assert stdout.split() == [str(run / "report.md"), str(run / "report.html")]
    assert {f: (run / f).read_bytes() for f in before} == before
    assert not list(run.glob(".*.tmp"))
    code, _, stderr = run_cli("report", tmp_path)  # not a run
    assert code == 2 and f"{tmp_path / 'config.json'} is missing" in stderr and "Traceback" not in stderr


def test_an_image_gone_since_the_run_is_still_listed(run, tmp_path):
    from headstart.reports.html import write_reports

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    text = (copy / "test_predictions.csv").read_text(encoding="utf-8", errors="surrogateescape")
    rows = list(csv.DictReader(text.splitlines()))
    worst = max((r for r in rows if r["correct"] == "0"), key=lambda r: float(r["probability"]))
    gone = str(tmp_path / "moved-away.png")
    (copy / "test_predictions.csv").write_bytes(text.replace(worst["path"], gone).encode("utf-8", "surrogateescape"))
    write_reports(copy)
    figure = re.search(r"<figure>(.*?)</figure>", (copy / "report.html").read_text(encoding="utf-8"), re.S).group(1)
    assert "not readable now" in figure and f"<b>{shown(gone)}</b>" in figure  # outside the data folder: all of it


def test_a_run_without_a_test_split_says_so(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    del metrics["test"]
    (copy / "metrics.json").write_text(json.dumps(metrics))
    for f in ("test_predictions.csv", "confusion_matrix.png", "worst_errors.png"):
        (copy / f).unlink()
    assert headstart.report(copy) == [copy / "report.md", copy / "report.html"]  # the Python API of the command
    page = (copy / "report.html").read_text(encoding="utf-8")
    assert "No test split: pass --test-fraction &gt; 0" in page
    assert "<figure>" not in page and "Confusion matrix" not in page and "test_predictions.csv" not in page
    assert "No test split" in (copy / "report.md").read_text(encoding="utf-8", errors="surrogateescape")


@pytest.fixture(scope="module")
def compare_dir(fmnist_tiny, tmp_path_factory, one_torch_thread) -> Path:
    from headstart.runs.compare import compare

    out = tmp_path_factory.mktemp("compare") / "cmp"
    compare(fmnist_tiny, out=out, strategies=["feature-extraction-linear"], image_size=32, workers=0)
    return out


def test_compare_html_links_each_runs_report(compare_dir):
    page = (compare_dir / "compare.html").read_text(encoding="utf-8")
    row = json.loads((compare_dir / "compare.json").read_text())["runs"][0]
    assert '<a href="feature-extraction-linear/report.html">feature-extraction-linear</a>' in page
    assert (compare_dir / "feature-extraction-linear" / "report.html").is_file()
    low, high = row["test_accuracy_ci95"]
    assert f"{row['test_accuracy']:.4f} [{low:.3f}, {high:.3f}]" in page
    assert 'src="data:image/png;base64,' in page
    before = page
    (compare_dir / "compare.html").unlink()
    code, stdout, stderr = run_cli("report", compare_dir)
    assert code == 0 and stdout.strip() == str(compare_dir / "compare.html"), stderr
    assert (compare_dir / "compare.html").read_text(encoding="utf-8") == before


@pytest.fixture(scope="module")
def inspect_dir(tmp_path_factory, one_torch_thread) -> Path:
    """inspect.html of a small folder with an ant labelled bee (a label finding, drawn with its two maps) and a
    test image copied into train (a leak)."""
    from headstart.inspection import inspect

    root = tmp_path_factory.mktemp("inspect")
    train = write_image_folder(root / "data" / "train", n_per_class=12, classes=("ant", "bee", "cow"), size=(24, 24))
    test = write_image_folder(root / "data" / "test", n_per_class=4, classes=("ant", "bee", "cow"), size=(24, 24),
                              seed=1)
    shutil.move(train / "ant" / "ant_003.png", train / "bee" / "moved.png")
    shutil.copy(test / "cow" / "cow_001.png", train / "cow" / "copy.png")
    found = inspect(root / "data", out=root / "out", cache_dir="none", folds=3, backbone="small_cnn",
                    weights="none", image_size=32, workers=0)
    assert {r["kind"] for r in found.issues} >= {"label", "leak"}
    return found.out


def test_the_pages_render_offline_in_headless_chromium(run, compare_dir, inspect_dir):
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium).")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync", "--disable-quic", "--disable-dev-shm-usage"])
        try:
            for path, shot in ((run / "report.html", "report-page.png"),
                               (compare_dir / "compare.html", "compare-page.png"),
                               (inspect_dir / "inspect.html", "inspect-page.png")):
                page = browser.new_page(viewport={"width": 1100, "height": 800})
                requests, problems = [], []
                page.on("request", lambda r: requests.append(r.url))
                page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                        if m.type in ("error", "warning") else None)
                page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
                page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
                page.goto(path.as_uri(), wait_until="load")
                images = page.evaluate("Array.from(document.images, i => [i.alt, i.complete, i.naturalWidth])")
                assert images and all(done and width > 0 for _, done, width in images), images
                # Probabilities (and the command's words) are laid out on one line each: none wraps mid-number.
                lines = page.evaluate("Array.from(document.querySelectorAll('.p'), "
                                      "e => [e.textContent, e.getClientRects().length])")
                assert all(n == 1 for _, n in lines), [t for t, n in lines if n != 1]
                if path.name == "report.html":
                    assert any(t.startswith("(p=") for t, _ in lines)
                page.screenshot(path=str(ARTIFACTS / shot), full_page=True)
                page.close()
                assert problems == [], problems
                assert [u for u in requests if not u.startswith("data:")] == [path.as_uri()], requests
        finally:
            browser.close()
