"""report.html and compare.html: what they hold, that user strings are escaped, that `headstart report` rebuilds
them byte for byte, and that headless Chromium renders them with no error and no request but the file itself.

One real run (Fashion-MNIST tiny, 32 px, MLP head so it has a training curve) on a copy of the data in which one
class is named with a `<script>` tag and another with bytes that are not UTF-8, plus two unusable files.
"""

from __future__ import annotations

import csv
import html
import json
import os
import re
import shutil
from pathlib import Path

import pytest

import headstart
from test_cli import run_cli

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"  # git-ignored
CHROMIUM = "/usr/bin/chromium"
SCRIPT_CLASS = "Bag<script>alert(1)"
LATIN1_CLASS = os.fsdecode(b"Sandal-caf\xe9")  # not UTF-8: arrives with a surrogate
BROKEN = os.fsdecode(b"broken-\xff.png")


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
    for row in test["per_class"]:  # the per-class table, every class
        assert (f"<td>{shown(row['class'])}</td><td class=\"n\">{row['precision']:.4f}</td>"
                f"<td class=\"n\">{row['recall']:.4f}</td>") in page, row["class"]
    cm = re.search(r'<table class="cm">(.*?)</table>', page, re.S).group(1)
    cells = [int(n) for n in re.findall(r"<td[^>]*>(\d+)</td>", cm)]
    assert cells == [n for row in test["confusion_matrix"] for n in row]
    assert '<img class="plot" alt="Training curve" src="data:image/png;base64,' in page  # the MLP's history
    assert '<a href="test_predictions.csv">' in page


def test_report_shows_the_worst_errors_as_thumbnails_with_their_file_names(run):
    page = (run / "report.html").read_text(encoding="utf-8")
    with open(run / "test_predictions.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        wrong = [r for r in csv.DictReader(f) if r["correct"] == "0"]
    assert wrong, "the tiny run made no mistake to show"
    wrong.sort(key=lambda r: -float(r["probability"]))
    figures = re.findall(r"<figure>(.*?)</figure>", page, re.S)
    assert len(figures) == min(16, len(wrong))
    assert f"{len(figures)} of the {len(wrong)} wrong predictions" in page
    for fig, r in zip(figures, wrong):
        assert f"<b>{shown(Path(r['path']).name)}</b>" in fig
        assert f"true: {shown(r['true'])}<br>predicted: {shown(r['predicted'])}" in fig
        assert re.search(r'<img alt="[^"]+" src="data:image/png;base64,[A-Za-z0-9+/=]+">', fig)


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
    assert "not readable now" in figure and "<b>moved-away.png</b>" in figure


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


def test_the_pages_render_offline_in_headless_chromium(run, compare_dir):
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium).")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync", "--disable-quic", "--disable-dev-shm-usage"])
        try:
            for path, shot in ((run / "report.html", "report-page.png"), (compare_dir / "compare.html",
                                                                          "compare-page.png")):
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
                page.screenshot(path=str(ARTIFACTS / shot), full_page=True)
                page.close()
                assert problems == [], problems
                assert [u for u in requests if not u.startswith("data:")] == [path.as_uri()], requests
        finally:
            browser.close()
