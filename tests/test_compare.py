"""`headstart compare`: its plot and table, and what an interrupted compare leaves."""

from __future__ import annotations

import json
import signal
from itertools import combinations

import pytest
from matplotlib.figure import Figure

from headstart.runs.compare import format_table, plot_compare
from reliability_helpers import CliChild
from test_cli import run_cli


def _row(name, wall, acc, ci, size=64, extract=None, train=None, n_test=40):
    return {"strategy": name, "run": f"/x/{name}", "image_size": size, "test_accuracy": acc,
            "test_accuracy_ci95": ci, "n_test_images": n_test,
            "balanced_accuracy": acc, "wall_seconds": wall, "trainable_parameters": 12_810,
            "extraction_images_per_second": extract, "training_images_per_second": train, "epochs": None,
            "n_train_images": 108}


# Wilson intervals of 24, 30, 30 and 32 correct out of 40
ROWS = [_row("scratch", 30.0, 0.6, [0.4460, 0.7365], size=32, train=400.0),
        _row("feature-extraction-linear", 11.0, 0.75, [0.5981, 0.8581], extract=150.0),
        _row("feature-extraction-mlp", 11.3, 0.75, [0.5981, 0.8581], extract=151.0),  # nearly the same point
        _row("fine-tune", 60.0, 0.8, [0.6524, 0.8950], extract=149.0, train=90.0)]


def test_compare_plot_labels_do_not_overprint(tmp_path, monkeypatch):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    saved = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **kw: (saved.append(fig), real(fig, *a, **kw))[1])
    plot_compare(ROWS, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 0
    fig = saved[0]
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    labels = [t for ax in fig.axes for t in ax.texts]
    assert sorted(t.get_text() for t in labels) == sorted(r["strategy"] for r in ROWS)
    boxes = {t.get_text(): t.get_window_extent(renderer) for t in labels}
    overlapping = [(a, b) for a, b in combinations(boxes, 2) if boxes[a].overlaps(boxes[b])]
    assert overlapping == []


def test_compare_table_separates_speeds_and_shows_sizes_and_intervals():
    lines = format_table({"runs": ROWS}).splitlines()
    assert lines[0].split() == ["strategy", "size", "test", "acc", "[95%", "interval]", "bal", "acc", "wall", "s",
                                "trainable", "extract/s", "train/s"]
    cells = {line.split()[0]: line.split() for line in lines[2:6]}
    assert cells["scratch"][1] == "32" and cells["scratch"][-2:] == ["-", "400"]
    assert cells["feature-extraction-linear"][1] == "64" and cells["feature-extraction-linear"][-2:] == ["150", "-"]
    assert cells["fine-tune"][-2:] == ["149", "90"]
    assert cells["fine-tune"][2:5] == ["0.8000", "[0.652,", "0.895]"]  # 32 of 40, Wilson
    big = format_table({"runs": [{**r, "n_test_images": 20_000} for r in ROWS]})
    assert "[" not in big and "interval" not in big


@pytest.mark.slow
def test_ctrl_c_during_compare_keeps_only_finished_runs_and_the_rerun_resumes(fmnist_tiny, tmp_path,
                                                                             one_torch_thread):
    out = tmp_path / "cmp"
    args = ("compare", fmnist_tiny, "--out", out, "--strategies", "feature-extraction-linear,scratch",
            "--image-size", "32", "--workers", "0", "--epochs", "2")
    # Ctrl-C right after scratch's first epoch is checkpointed: its cache and checkpoints exist by then.
    code, _, stderr = CliChild(tmp_path, *args, fault="sigint-epoch:1", new_session=True).finish()
    assert code == 130, stderr
    assert stderr.strip().splitlines()[-1] == (f"headstart: interrupted; feature-extraction-linear finished and kept "
                                               f"in {out}; run the same compare again to train the rest.")
    assert "Traceback" not in stderr
    assert sorted(p.name for p in out.iterdir()) == ["compare.settings.json", "feature-extraction-linear"]
    kept = (out / "feature-extraction-linear" / "metrics.json").read_text()

    code, stdout, stderr = run_cli(*args)  # the same command, no --overwrite
    assert code == 0, stderr
    assert "feature-extraction-linear already finished" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["compare.html", "compare.json", "compare.png",
                                                     "compare.settings.json", "feature-extraction-linear", "scratch"]
    assert (out / "feature-extraction-linear" / "metrics.json").read_text() == kept
    result = json.loads((out / "compare.json").read_text())
    assert [r["strategy"] for r in result["runs"]] == ["feature-extraction-linear", "scratch"]
    code, _, stderr = run_cli("compare", fmnist_tiny, "--out", out, "--image-size", "64")  # other settings
    assert code == 2 and "--overwrite" in stderr


@pytest.mark.slow
def test_ctrl_c_while_fine_tuning_says_how_to_resume(fmnist_tiny, tmp_path, one_torch_thread):
    args = ("train", fmnist_tiny, "--strategy", "scratch", "--epochs", "2", "--workers", "0", "--cache-dir", "none",
            "--out", tmp_path / "run")
    code, _, stderr = CliChild(tmp_path, *args, fault="sigint-epoch:1", new_session=True).finish()
    assert code == 130, stderr
    assert stderr.strip().splitlines()[-1] == (
        f"headstart: interrupted; fine-tuning checkpoints of the last finished epoch are kept in "
        f"{tmp_path / 'run.checkpoints'}; continue with: headstart train --resume {tmp_path / 'run'}")
    assert "nothing partial was kept" not in stderr
    code, _, stderr = run_cli("train", "--resume", tmp_path / "run")
    assert code == 0 and "resumed fine-tuning after epoch 1" in stderr


def test_compare_plot_goes_through_the_shared_png_writer(tmp_path):
    # plots.save_png writes at the figure's own dpi; a user's savefig.dpi setting must not resize the plot.
    import matplotlib
    from PIL import Image

    from headstart.runs.compare import compare_figure

    with matplotlib.rc_context({"savefig.dpi": 50}):
        plot_compare(ROWS, tmp_path / "compare.png")
    fig = compare_figure(ROWS)
    width, height = fig.get_size_inches() * fig.dpi
    with Image.open(tmp_path / "compare.png") as image:
        assert image.size == (round(width), round(height)) == (770, 495)
    assert not list(tmp_path.glob("*.tmp"))
