"""predict.py: inputs expanded in order, every input answered or listed, evaluation's samples and errors."""

from __future__ import annotations

import numpy as np
import pytest

import headstart
from conftest import write_image_folder
from headstart.runs import predict
from headstart.errors import DataError
from headstart.settings import Runtime

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RT = Runtime(engine="torch", cache_dir="none", workers=0)


@pytest.fixture(scope="module")
def model(small_run):
    return headstart.load(small_run)


def test_expand_inputs_keeps_the_given_order_and_sorts_inside_folders(tmp_path):
    root = write_image_folder(tmp_path / "d", n_per_class=2, classes=("b", "a"), size=(8, 8))
    (root / "a" / "deeper").mkdir()
    (root / "a" / "deeper" / "z.png").write_bytes((root / "a" / "a_000.png").read_bytes())
    (root / "a" / "notes.txt").write_text("not an image")
    single = root / "b" / "b_001.png"
    ignored = []
    paths = predict.expand_inputs([single, root / "a", tmp_path / "missing.png"], ignored)
    assert paths[0] == str(single.absolute()) and paths[-1] == str((tmp_path / "missing.png").absolute())
    folder = paths[1:-1]
    assert folder == sorted(folder) and len(folder) == 3 and not any(p.endswith(".txt") for p in folder)
    assert ignored == [{"path": str(root / "a" / "notes.txt"), "reason": "not an image file extension"}]


def test_predict_on_a_folder_lists_its_non_image_files_as_skipped(model, small_run, tmp_path, caplog):
    folder = tmp_path / "photos"
    folder.mkdir()
    images = sorted((small_run.parent / "data").rglob("*.png"))[:2]
    for p in images:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "notes.txt").write_text("not an image")
    rows, skipped = predict.predict_files(model, [folder], runtime=RT)
    assert len(rows) == 2
    assert skipped == [{"path": str(folder / "notes.txt"), "reason": "not an image file extension"}]
    assert f"skipping {folder / 'notes.txt'}: not an image file extension" in caplog.text


def test_predict_files_answers_in_input_order_and_lists_what_it_skipped(model, small_run, tmp_path):
    images = sorted(str(p) for p in (small_run.parent / "data").rglob("*.png"))
    broken = tmp_path / "broken.png"
    broken.write_text("not a png")
    missing = tmp_path / "missing.png"
    inputs = [images[5], missing, images[0], broken, images[17]]
    rows, skipped = predict.predict_files(model, inputs, top_k=2, runtime=RT)
    assert [r["path"] for r in rows] == [images[5], images[0], images[17]]
    assert [s["path"] for s in skipped] == [str(missing), str(broken)] and all(s["reason"] for s in skipped)
    for r in rows:
        probs = [p["probability"] for p in r["predictions"]]
        assert len(probs) == 2 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9
    alone, _ = predict.predict_files(model, [images[0]], top_k=2, runtime=RT)
    # a neighbour's failure changes nothing (to the last bits a different batch size may move)
    assert [p["class"] for p in alone[0]["predictions"]] == [p["class"] for p in rows[1]["predictions"]]
    assert [p["probability"] for p in alone[0]["predictions"]] == pytest.approx(
        [p["probability"] for p in rows[1]["predictions"]], abs=1e-6)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        predict.predict_files(model, [tmp_path / "empty"], runtime=RT)


def test_features_of_leaves_unusable_rows_out_and_names_them(model, small_run, tmp_path):
    images = sorted(str(p) for p in (small_run.parent / "data").rglob("*.png"))[:3]
    missing = str(tmp_path / "gone.png")
    feats, failures = predict.features_of(model, [images[0], missing, images[1], images[2]], RT)
    assert feats.shape == (3, model.entry.feature_dim) and np.isfinite(feats).all()
    assert list(failures) == [missing]
    full, _ = predict.features_of(model, images, RT)
    assert np.array_equal(feats, full)


def test_predict_proba_nan_rows_sit_where_the_bad_inputs_were(model, small_run, tmp_path):
    images = sorted(str(p) for p in (small_run.parent / "data").rglob("*.png"))[:2]
    proba = model.predict_proba([str(tmp_path / "x.png"), images[0], images[1]], RT, errors="nan")
    assert np.isnan(proba[0]).all() and np.allclose(proba[1:].sum(axis=1), 1)
    assert np.array_equal(proba[1:], model.predict_proba(images, RT))


def test_evaluate_refuses_classes_the_model_does_not_know_and_warns_about_absent_ones(model, tmp_path, caplog):
    other = write_image_folder(tmp_path / "other", n_per_class=2, classes=("ant", "yak"), size=(12, 10))
    with pytest.raises(DataError, match=r"classes the model does not know: \['yak'\]"):
        predict.evaluate(model, other, runtime=RT)
    only_ant = write_image_folder(tmp_path / "ants", n_per_class=3, classes=("ant",), size=(12, 10))
    metrics = predict.evaluate(model, only_ant, runtime=RT)
    assert metrics["n_images"] == 3 and metrics["seen_in_training"] is None  # a Model alone knows no splits
    assert "no images of classes ['bee', 'cow']" in caplog.text


def test_evaluation_samples_use_the_test_split_of_a_split_folder(model, tmp_path):
    for split, n in (("train", 4), ("test", 2)):
        write_image_folder(tmp_path / "d" / split, n_per_class=n, classes=("ant", "bee", "cow"), size=(12, 10))
    paths, y, bad = predict.evaluation_samples(model, tmp_path / "d")
    assert len(paths) == 6 and all("/test/" in p for p in paths) and bad == []
    assert [model.classes[i] for i in y] == [p.split("/")[-2] for p in paths]


def test_evaluating_a_bundle_folder_needs_data(small_run):
    with pytest.raises(DataError, match="keeps no splits"):
        predict.evaluate(small_run / "model", runtime=RT)
    own = predict.evaluate(small_run, runtime=RT)
    assert own["n_images"] > 0 and own["seen_in_training"] == 0


def test_predicting_from_a_saved_model_does_not_import_scikit_learn(small_run):
    """Loading a bundle and predicting need the heads as torch modules only (head_modules.py): a `headstart
    predict` process starts 0.6 s sooner without scikit-learn (2.83 -> 2.18 s measured on one image)."""
    import subprocess
    import sys

    image = sorted((small_run.parent / "data").rglob("*.png"))[0]
    script = ("import sys\n"
              "from headstart.cli import main\n"
              f"assert main(['predict', {str(small_run)!r}, {str(image)!r}, '--engine', 'torch', '-q']) == 0\n"
              "assert 'torch' in sys.modules\n"
              "assert 'sklearn' not in sys.modules, 'predict imported scikit-learn'\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\t" in proc.stdout  # the prediction line: path, class, probability


def test_predict_json_and_csv_say_which_engine_and_precision_computed_the_numbers(small_run, capsys):
    """On a native-bf16 CPU the automatic precision is bf16, whose probabilities differ from fp32's beyond
    rounding: the output says what computed it, asked for or chosen by the rule."""
    import csv
    import io
    import json

    from headstart import cli
    from headstart.engines.rule import choose_engine

    image = str(sorted((small_run.parent / "data").rglob("*.png"))[0])
    auto = choose_engine("cpu")
    for flags, want in ((["--engine", "torch", "--precision", "fp32"], ("torch", "fp32")),
                        ([], (auto.engine, auto.precision))):
        common = ["predict", str(small_run), image, "--device", "cpu", "--cache-dir", "none", *flags]
        assert cli.main(common + ["--json"]) == 0
        answer = json.loads(capsys.readouterr().out)
        assert (answer["engine"]["engine"], answer["engine"]["precision"], answer["engine"]["device"]) == (*want, "cpu")
        assert answer["predictions"][0]["path"] == image
        assert cli.main(common + ["--csv", "--top-k", "2"]) == 0
        rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
        assert rows[0][-2:] == ["engine", "precision"] and rows[1][0] == image and tuple(rows[1][-2:]) == want


def test_an_ensembles_engines_are_stated_member_by_member_where_they_differ():
    from headstart.engines.choice import EngineChoice

    fp32 = EngineChoice("onnxruntime", "fp32", "cpu", "rule")
    int8 = EngineChoice("onnxruntime", "int8", "cpu", "the head learnt int8 features")
    assert predict.describe_engines([fp32]) == {"engine": "onnxruntime", "precision": "fp32", "device": "cpu"}
    assert predict.describe_engines([int8, fp32]) == {"engine": "onnxruntime", "precision": "int8+fp32",
                                                      "device": "cpu"}
