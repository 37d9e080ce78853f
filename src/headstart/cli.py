"""The `headstart` command: parses arguments, calls the Python API, prints.

Exit codes: 0 success; 1 unexpected internal error (a bug: the traceback is printed);
2 a problem with the input or environment (bad arguments, data, weights or model files,
a full disk or a permission: the message says what to do); 130 interrupted with Ctrl-C;
141 (128 + SIGPIPE) the reader of the output went away (`headstart train ... | head -3`):
no message, as Unix tools do, and a run that completed is kept.
`predict` exits 0 when at least one input was predicted (each unusable input, a missing
file included, is warned about on stderr and listed under "skipped" with --json), and 2
when none could be.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import difflib
import functools
import gc
import json
import logging
import os
import re
import sys

from headstart import progress
from headstart._version import __version__
from headstart.errors import HeadstartError, Interrupted, speaking_cli
from headstart.settings import (CLASS_WEIGHTS, DEVICES, ENGINES, ENSEMBLE, HEADS, LIMITS, PRECISIONS, SCRATCH_DEFAULTS,
                                TTAS, FineTuneSettings, Runtime, TrainConfig, check_limits, parse_duration)
from headstart.strategies import compare_rows, list_strategies
from headstart.progress import count

log = logging.getLogger("headstart")


def _size(value: str):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels or 'auto', not {value!r}") from None


def _duration(value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {value!r} (use e.g. 90s, 10m, 1h)") from None


class _Parser(argparse.ArgumentParser):
    """No prefix matching (`--epoch 3` is an error, not `--epochs`), and an unknown argument is reported
    by the (sub)command that got it: argparse's default hands a subcommand's leftovers to the top-level
    parser, whose usage does not show the subcommand's flags. A misspelt flag or choice names the closest
    one; a command whose usage runs to many lines points to its --help instead of printing them all."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            hints = [f"did you mean {close[0]}?" for x in extras if x.startswith("-")
                     for close in [difflib.get_close_matches(x.split("=", 1)[0], flags, n=1)] if close]
            self.error(f"unrecognized arguments: {' '.join(extras)}" + (f"; {' '.join(hints)}" if hints else ""))
        return namespace, extras

    def error(self, message):
        choice = re.match(r"argument .*: invalid choice: '(.*)' \(choose from (.*)\)$", message)
        if choice:
            offered = re.findall(r"'([^']*)'", choice.group(2))
            close = difflib.get_close_matches(choice.group(1), offered, n=1)
            message += f"; did you mean {close[0]!r}?" if close else ""
        usage = self.format_usage()
        if usage.count("\n") > 3:  # `train`'s runs to 30 lines
            usage = f"usage: {self.prog} [options] ... (`{self.prog} --help` lists them)\n"
        self.exit(2, f"{usage}{self.prog}: error: {message}\n")


_CACHE_DIR_HELP = ("feature cache folder; 'none' keeps features in memory only (default: $XDG_CACHE_HOME/headstart, "
                   "else ~/.cache/headstart)")
_LABELS_HELP = "CSV of path,label[,split], paths relative to the CSV (default: none; the class folders name the classes)"
_IMAGE_SIZE_HELP = (f"crop size in pixels ({LIMITS['image_size'].low}-{LIMITS['image_size'].high}) or 'auto' "
                    "(default: auto: the backbone's own size, or a smaller one for much smaller images; the log "
                    "says why)")
_WEIGHTS_HELP = ("'imagenet', 'none' (random init) or a weights file (default: imagenet: the file from a given path, "
                 "the torch cache, an installed package, or its download address, in that order)")
_SEED_HELP = ("seed of everything random in training (initialisation, shuffling, augmentation); the splits come "
              "from the file names, not the seed (default: %(default)s)")
_WORKERS_HELP = "image decoding processes (default: chosen from the CPU cores)"


def get_parser() -> argparse.ArgumentParser:
    from headstart.data.images import IMAGE_EXTENSIONS  # numpy and PIL, loaded already; not torch

    p = _Parser(prog="headstart", description="Transfer learning for image classification.")
    p.add_argument("--version", action="version", version=f"headstart {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and results; no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train", help="train a model on an image folder and write a run directory")
    t.add_argument("data", nargs="?", help="DATA/<class>/..., DATA/train|val|test/<class>/..., or the CSV's folder")
    t.add_argument("--labels", help=_LABELS_HELP)
    t.add_argument("--backbone", default=None,
                   help="the pretrained network to start from; `headstart backbones` lists them (default: "
                        "mobilenet_v2; small_cnn with --strategy scratch)")
    t.add_argument("--strategy", default="auto", choices=list_strategies(),
                   help="how to train (default: auto: feature extraction or fine-tuning, chosen from the data, with "
                        "its reasons in the log and config.json)")
    t.add_argument("--head", default="linear", choices=HEADS,
                   help="the classifier on the backbone's features: linear (logistic regression) or mlp (one "
                        "hidden layer) (default: %(default)s)")
    t.add_argument("--weights", default=None, help=_WEIGHTS_HELP)
    t.add_argument("--image-size", type=_size, default="auto", help=_IMAGE_SIZE_HELP)
    t.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the images held out for validation, from 0 to below 1, when DATA has no val/ "
                        "folder (default: %(default)s)")
    t.add_argument("--test-fraction", type=float, default=0.1,
                   help="share of the images held out for the test scores, from 0 to below 1, when DATA has no "
                        "test/ folder (default: %(default)s)")
    t.add_argument("--class-weight", choices=CLASS_WEIGHTS, default=None,
                   help="balanced: weigh classes by inverse frequency (default: every image counts the same)")
    t.add_argument("--seed", type=int, default=0, help=_SEED_HELP)
    _engine_args(t, workers=True)
    t.add_argument("--out", default=None, help="run directory (default: runs/<date and time>)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    t.add_argument("--strict", action="store_true",
                   help="stop before training if any image file cannot be used (unreadable, truncated, empty, a "
                        "CSV row naming a missing file, ...). Which files are images is decided by their extension ("
                        + " ".join(sorted(IMAGE_EXTENSIONS)) + "); other files (README.txt, notes) never stop the "
                        "run: they are listed as skipped, with the reason, as without --strict (default: skip "
                        "unusable images, list them and go on)")
    t.add_argument("--json", action="store_true", help="print the run directory and its metrics as JSON")
    t.add_argument("--cv", type=int, default=None, metavar="K",
                   help="feature extraction: also report K-fold accuracy (mean and spread) of the head on the "
                        "cached train + val features (default: no cross-validation)")
    t.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files into RUN/tensorboard (pip install 'headstart[tensorboard]')")
    t.add_argument("--tta", choices=TTAS, default="auto",
                   help="test-time views: 'flip' averages each image's probabilities with its mirror image's "
                        "(2 backbone passes per image) (default: auto: flips when they pay on validation)")
    f = t.add_argument_group("fine-tuning (--strategy fine-tune, scratch, ensemble, and auto when it fine-tunes)")
    _finetune_args(f)
    f.add_argument("--scratch-epochs", type=int, default=None,
                   help="--strategy ensemble (and auto's ensemble): epochs of the scratch member (default: "
                        f"{ENSEMBLE.scratch_epochs}; the fine-tuned member's are --epochs, default "
                        f"{ENSEMBLE.finetune_epochs})")
    f.add_argument("--resume", metavar="RUN", default=None,
                   help="continue the interrupted fine-tuning run RUN from its last checkpoint, with the settings "
                        "it was started with (default: start a new run)")

    # Acting on `headstart inspect` (data/issues.py), and the check on the run's features (runs/datacheck.py).
    ex = t.add_argument_group("data issues (headstart inspect)")
    ex.add_argument("--exclude", metavar="ISSUES_CSV", default=None,
                    help="leave out the files an issues.csv of `headstart inspect` lists (DATA is not touched); "
                         "the run records them in config.json and its report (default: none left out)")
    ex.add_argument("--exclude-kinds", metavar="KINDS", default=None,
                    help="with --exclude, only rows of these kinds, comma-separated, e.g. label,leak (default: "
                         "every kind)")
    ex.add_argument("--no-data-check", dest="data_check", action="store_false", default=True,
                    help="skip the check for likely label errors and train/test leaks on the run's features")

    ins = sub.add_parser("inspect", help="find wrong labels, leaks, near duplicates, strays and odd images in an "
                                         "image folder (writes issues.csv, summary.json, inspect.html)")
    ins.add_argument("data", help="an image folder as for train, or the CSV's folder with --labels")
    ins.add_argument("--labels", help="CSV of path,label[,split] (paths relative to the CSV; default: the class "
                                      "folders of DATA)")
    ins.add_argument("--out", default=None, help="folder for the findings (default inspections/<DATA name>)")
    ins.add_argument("--backbone", default=None, help="see `headstart backbones` (default mobilenet_v2)")
    ins.add_argument("--weights", default=None,
                     help="'imagenet' (default: search the usual places), 'none' (random init), or a file")
    ins.add_argument("--image-size", type=_size, default="auto",
                     help="crop size in pixels; 'auto' (default) is train's, so the features cached are shared")
    ins.add_argument("--folds", type=int, default=5,
                     help="K of the K-fold head fits whose out-of-fold probabilities judge the labels (default 5)")
    ins.add_argument("--val-fraction", type=float, default=0.1, help="as for train: the splits the findings name (default 0.1)")
    ins.add_argument("--test-fraction", type=float, default=0.1, help="as for train (default 0.1)")
    ins.add_argument("--seed", type=int, default=0, help="seed of the folds and of anything random in the checks, "
                     "as for train (default: 0)")
    ins.add_argument("--json", action="store_true", help="print summary.json")
    _engine_args(ins, workers=True)

    xt = sub.add_parser("extract", help="only fill the feature cache (for large jobs; runs under torchrun too)")
    xt.add_argument("data", help="an image folder as for train, or the CSV's folder with --labels")
    xt.add_argument("--labels", help=_LABELS_HELP)
    xt.add_argument("--backbone", default="mobilenet_v2",
                    help="the network whose features to cache; `headstart backbones` lists them (default: "
                         "%(default)s)")
    xt.add_argument("--weights", default=None, help=_WEIGHTS_HELP)
    xt.add_argument("--image-size", type=_size, default="auto", help=_IMAGE_SIZE_HELP)
    xt.add_argument("--json", action="store_true", help="print the counts and throughput as JSON")
    _engine_args(xt, workers=True)

    cp = sub.add_parser("compare", help="train scratch, feature extraction (linear, mlp) and fine-tuning side by side")
    cp.add_argument("data", help="an image folder, as for train")
    cp.add_argument("--out", required=True, help="folder for the runs, compare.json and compare.png (required)")
    cp.add_argument("--strategies", default=None,
                    help="comma-separated subset of: " + ", ".join(compare_rows()) + " (default: all of them)")
    cp.add_argument("--seed", type=int, default=0, help=_SEED_HELP)
    cp.add_argument("--image-size", type=_size, default="auto", help=_IMAGE_SIZE_HELP)
    cp.add_argument("--workers", type=int, default=None, help=_WORKERS_HELP)
    cp.add_argument("--epochs", type=int, default=None,
                    help="epochs of scratch and fine-tune (default: each its own, "
                         f"{SCRATCH_DEFAULTS['epochs']} and {FineTuneSettings.epochs}, with early stopping)")
    cp.add_argument("--overwrite", action="store_true",
                    help="train every strategy again in an --out folder that holds runs already")
    cp.add_argument("--json", action="store_true", help="print the comparison as JSON")

    e = sub.add_parser("evaluate", help="metrics of a trained model on a folder")
    e.add_argument("run", help="run directory or model bundle")
    e.add_argument("data", nargs="?", default=None,
                   help="folder of class subfolders (a folder with splits is evaluated on test/) (default: the "
                        "run's own test split, from its splits.csv)")
    e.add_argument("--labels", help="CSV of path,label, paths relative to the CSV (default: none; the class "
                                    "folders name the classes)")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _engine_args(e)

    pr = sub.add_parser("predict", help="classify image files and folders")
    pr.add_argument("run", help="run directory or model bundle")
    pr.add_argument("inputs", nargs="+", help="image files and folders (searched recursively)")
    pr.add_argument("--top-k", type=int, default=1,
                    help="classes per image, most probable first (default: %(default)s)")
    fmt = pr.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true",
                     help="print the predictions and the skipped files as JSON (default: one line per image)")
    fmt.add_argument("--csv", action="store_true",
                     help="print CSV: the path, then the class and probability of each of the top k")
    _engine_args(pr)

    sv = sub.add_parser("serve", help="serve a trained model over HTTP, with a page to try it in a browser "
                                      "(needs headstart[serve])")
    sv.add_argument("run", help="run directory or model bundle")
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default: 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default: %(default)s)")
    sv.add_argument("--max-upload-mb", type=float, default=20.0,
                    help="largest request body, in MB (default: %(default)g)")
    sv.add_argument("--token", default=os.environ.get("HEADSTART_TOKEN"),
                    help="require `Authorization: Bearer TOKEN` on every request but /healthz and the page "
                         "(default: $HEADSTART_TOKEN, else none)")
    sv.add_argument("--top-k", type=int, default=3,
                    help="classes per image when a request does not say (?top_k=) (default: %(default)s)")
    _engine_args(sv)

    rp = sub.add_parser("report", help="rebuild report.md and report.html of a run (compare.html of a compare "
                                       "folder) from its files")
    rp.add_argument("run", help="run directory, or the --out folder of a compare")

    bb = sub.add_parser("backbones", help="list the backbones, their sizes and whether weights are available")
    bb.add_argument("--timm", metavar="PATTERN", default=None,
                    help="list timm's models matching PATTERN instead (wildcards, e.g. 'resnet*'); "
                         "use them as --backbone timm:NAME (default: list headstart's own backbones)")

    c = sub.add_parser("cache", help="inspect or clear the cache (features, converted backbones, downloads)")
    c.add_argument("action", choices=["info", "clear"],
                   help="info: what the cache holds and its size; clear: delete all of it")
    c.add_argument("--cache-dir", default=None,
                   help="the cache folder (default: $XDG_CACHE_HOME/headstart, else ~/.cache/headstart)")
    c.add_argument("--json", action="store_true", help="print the answer as JSON")

    d = sub.add_parser("datasets", help="write built-in data sets as image folders")
    d.add_argument("action", choices=["prepare"], help="prepare: write the data set as image folders")
    d.add_argument("name", help="the data set: fashion-mnist")
    d.add_argument("out", help="folder to write")
    d.add_argument("--per-class", type=int, default=None,
                   help="keep the first N training images of each class (1000 gives FMNIST-TL) (default: all)")
    d.add_argument("--test-per-class", type=int, default=None,
                   help="keep the first N test images of each class (default: the whole test set)")

    x = sub.add_parser("export", help="write a trained model as ONNX, with a JSON stating its preprocessing")
    x.add_argument("run", help="run directory or model bundle")
    x.add_argument("--format", default="onnx", choices=["onnx"], help="file format (default: %(default)s, the only one)")
    x.add_argument("--out", default=None, help="folder to write model.onnx into (default: RUN/onnx)")
    x.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    batch = x.add_mutually_exclusive_group()
    batch.add_argument("--dynamic-batch", dest="dynamic_batch", action="store_true", default=True,
                       help="any batch size (the default)")
    batch.add_argument("--static-batch", dest="dynamic_batch", action="store_false", help="batch size fixed at 1")
    x.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")

    _explain_parser(sub)

    # --quiet/--verbose also work after the command (`headstart train DATA -q`); SUPPRESS keeps
    # a subcommand's unset flag from overwriting one given before the command.
    for sp in sub.choices.values():
        sp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def _engine_args(p: argparse.ArgumentParser, workers: bool = False) -> None:
    """The Runtime settings as flags, defaults and choices from settings.Runtime."""
    d = Runtime()
    p.add_argument("--device", default=d.device, choices=DEVICES,
                   help="where the network runs (default: %(default)s: cuda when PyTorch sees a GPU, else cpu)")
    p.add_argument("--engine", default=d.engine, choices=("auto", *ENGINES),
                   help="what runs the frozen backbone (default: auto: torch on a GPU; on a CPU openvino where it "
                        f"has native bf16, else the first installed of {', '.join(ENGINES)})")
    p.add_argument("--precision", default=d.precision, choices=("auto", *PRECISIONS),
                   help="arithmetic of the frozen backbone; int8 quantises it, calibrated on 256 training images "
                        "(feature extraction only) (default: auto: bf16 on a CPU with native bf16 units, unless "
                        "onnxruntime runs it; else fp32)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="images per network call (default: %(default)s)")
    if workers:
        p.add_argument("--workers", type=int, default=d.workers, help=_WORKERS_HELP)
    p.add_argument("--cache-dir", default=d.cache_dir, help=_CACHE_DIR_HELP)


def _runtime(a) -> Runtime:
    return Runtime(device=a.device, engine=a.engine, precision=a.precision, batch_size=a.batch_size,
                   workers=getattr(a, "workers", None), cache_dir=a.cache_dir)


def _finetune_args(group) -> None:
    """One flag per FineTuneSettings field (settings.py): its type, choices and help come from the field.
    Every default is None, so that only what was given reaches train(), which fills in the rest."""
    import typing

    hints = typing.get_type_hints(FineTuneSettings)
    for f in FineTuneSettings.cli_fields():
        kw = {"default": None, "help": f"{f.metadata['help']} ({_finetune_default(f)})"}
        if hints[f.name] is bool:
            kw["action"] = "store_true"
        elif "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        elif "parse" in f.metadata:
            kw["type"] = _duration if f.metadata["parse"] is parse_duration else f.metadata["parse"]
        elif hints[f.name] in (int, float):
            kw["type"] = hints[f.name]
        # anything else (unfreeze: a number or "all") stays a string; FineTuneSettings.validate parses it
        group.add_argument("--" + f.name.replace("_", "-"), **kw)


def _finetune_default(f) -> str:
    """A fine-tuning flag's default in words: the field's, and where a strategy sets another (scratch's from
    SCRATCH_DEFAULTS, the ensemble's epochs from ENSEMBLE)."""
    def said(value) -> str:
        if isinstance(value, bool):
            return "on" if value else "off"
        return f"{value:g}" if isinstance(value, float) else str(value)

    default = f.metadata.get("default_words") or said(f.default)
    others = {}
    if f.name in SCRATCH_DEFAULTS and SCRATCH_DEFAULTS[f.name] != f.default:
        others["scratch"] = said(SCRATCH_DEFAULTS[f.name])
    if f.name == "epochs":
        others["ensemble and auto's ensemble (the fine-tuned member)"] = said(ENSEMBLE.finetune_epochs)
    if not others:
        return f"default: {default}"
    return (f"default: {default} with --strategy fine-tune or auto, "
            + ", ".join(f"{v} with {k}" for k, v in others.items()))


def cmd_train(a) -> int:
    from headstart.runs.train import resume, train

    if a.resume:
        return _print_run(resume(a.resume), a.json)
    if not a.data and not a.labels:
        raise HeadstartError("train needs a DATA folder (or --labels FILE.csv, or --resume RUN).")
    data = a.data or os.path.dirname(os.path.abspath(a.labels))  # with --labels, paths are relative to the CSV
    finetune = {f.name: getattr(a, f.name) for f in FineTuneSettings.cli_fields() if getattr(a, f.name) is not None}
    settings = {k: getattr(a, k) for k in TrainConfig.__dataclass_fields__
                if k not in ("data", "finetune", "finetune_given", "resume")}
    return _print_run(train(data, finetune=finetune, **settings), a.json)


def cmd_inspect(a) -> int:
    from headstart.inspection import inspect

    data = a.data or os.path.dirname(os.path.abspath(a.labels))
    found = inspect(data, labels=a.labels, out=a.out, backbone=a.backbone, weights=a.weights,
                    image_size=a.image_size, folds=a.folds, val_fraction=a.val_fraction,
                    test_fraction=a.test_fraction, seed=a.seed, runtime=_runtime(a))
    if a.json:
        print(json.dumps(found.summary, indent=2))
        return 0
    counts = found.summary["counts"]
    print("\n".join(f"{kind:>18}: {n}" for kind, n in counts.items()) or "no issues found")
    print(f"\n{found.out / 'issues.csv'}\n{found.out / 'inspect.html'}")
    print(f"train without them: headstart train {data} --exclude {found.out / 'issues.csv'} "
          "[--exclude-kinds label,leak]")
    return 0


def cmd_extract(a) -> int:
    from headstart.runs.extract import extract_features

    rt = _runtime(a)
    r = extract_features(a.data, labels=a.labels, backbone=a.backbone, weights=a.weights, image_size=a.image_size,
                         device=rt.device, engine=rt.engine, precision=rt.precision, batch_size=rt.batch_size,
                         workers=rt.workers, cache_dir=rt.cache_dir)
    if r["rank"]:  # under torchrun rank 0 reports for every rank
        return 0
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    rate = lambda v: f"{v:.1f} images/s" if v else "-"  # noqa: E731
    for x in r["ranks"]:
        print(f"rank {x['rank']}: " + (f"{count(x['computed'], 'image')} computed in {x['seconds']:.1f}s "
                                       f"({rate(x['images_per_second'])})" if x["computed"] else "none to compute"))
    # "all N from cache", not "N from cache, 0 computed in 0.1s (-)" (issue 29)
    done = (f"{r['from_cache']} from cache, {r['computed']} computed in {r['seconds']:.1f}s "
            f"({rate(r['images_per_second'])})" if r["computed"] else f"all {r['from_cache']} from cache")
    print(f"in all: {count(r['images'], 'image')}, {done} on world size {r['world_size']}; "
          f"skipped {count(r['failed'], 'file')}; cache {r['cache_dir']} ({r['backbone']} {r['image_size']}px "
          f"{r['engine']}/{r['precision']})")
    return 0


def _print_run(run, as_json: bool) -> int:
    if run is None:  # a rank other than 0 under torchrun: rank 0 prints the run
        return 0
    if as_json:
        print(json.dumps({"run_dir": str(run.run_dir), **run.metrics}, indent=2))
        return 0
    from headstart.reports.tables import format_report

    if "test" in run.metrics:
        print(format_report(run.metrics["test"]))
    m = run.metrics
    if "cv" in m:
        cv = m["cv"]
        print(f"\n{cv['k']}-fold cross-validation (train + val, {cv['n_images']} images): accuracy "
              f"{cv['accuracy_mean']:.4f} +- {cv['accuracy_std']:.4f} (folds {', '.join(f'{a:.4f}' for a in cv['folds'])})")
    print(f"\nrun: {run.run_dir}  (wall {m['wall_seconds']:.0f}s; features: {m['extraction']['from_cache']} from "
          f"cache, {m['extraction']['computed']} computed; skipped {count(len(run.skipped), 'file')})")
    return 0


def cmd_compare(a) -> int:
    from headstart.runs.compare import compare, format_table

    names = [n.strip() for n in a.strategies.split(",")] if a.strategies else None
    budget = {"finetune": {"epochs": a.epochs}} if a.epochs is not None else {}
    result = compare(a.data, out=a.out, seed=a.seed, strategies=names, overwrite=a.overwrite,
                     image_size=a.image_size, workers=a.workers, **budget)
    print(json.dumps(result, indent=2) if a.json else format_table(result))
    return 0


def cmd_evaluate(a) -> int:
    from headstart.reports.tables import format_report
    from headstart.runs.predict import evaluate

    metrics = evaluate(a.run, a.data, labels=a.labels, runtime=_runtime(a))
    print(json.dumps(metrics, indent=2) if a.json else format_report(metrics))
    return 0


def cmd_predict(a) -> int:
    from headstart.models.bundle import load
    from headstart.runs.predict import engine_used, predict_files

    check_limits(top_k=a.top_k)  # these two before the model is loaded
    runtime = _runtime(a)
    model = load(a.run)
    rows, skipped = predict_files(model, a.inputs, top_k=a.top_k, runtime=runtime)
    engine = engine_used(model, runtime)  # what computed the numbers: bf16 and fp32 differ beyond rounding
    if a.json:
        print(json.dumps({"engine": engine, "predictions": rows, "skipped": skipped}, indent=2))
    elif a.csv:
        w = csv.writer(sys.stdout)
        k = len(rows[0]["predictions"]) if rows else a.top_k
        w.writerow(["path"] + [f"{c}{i}" for i in range(1, k + 1) for c in ("class", "probability")]
                   + ["engine", "precision"])
        for r in rows:
            w.writerow([r["path"]] + [v for p in r["predictions"] for v in (p["class"], f"{p['probability']:.6f}")]
                       + [engine["engine"], engine["precision"]])
    else:
        for r in rows:
            preds = ", ".join(f"{p['class']} {p['probability']:.3f}" for p in r["predictions"])
            print(f"{r['path']}\t{preds}")
    # Each skipped file was warned about once already, as it was read; the exit status sums it up.
    if not rows:
        print(f"headstart: error: none of the {len(skipped)} inputs could be predicted (see the warnings above).",
              file=sys.stderr)
        return 2
    return 0


def cmd_serve(a) -> int:
    check_limits(top_k=a.top_k, port=a.port)  # before torch is imported and the model loaded and warmed up
    from headstart.serve.app import serve

    return serve(a.run, host=a.host, port=a.port, max_upload_mb=a.max_upload_mb, token=a.token, top_k=a.top_k,
                 log_level="warning" if a.quiet else "info", runtime=_runtime(a))


def cmd_report(a) -> int:
    from headstart.reports.html import report

    for path in report(a.run):
        print(path)
    return 0


def cmd_backbones(a) -> int:
    from headstart.nets.registry import get_backbone, list_backbones
    from headstart.nets.weights import weights_available

    if a.timm is not None:
        from headstart.nets.timm_models import list_timm

        rows = list_timm(a.timm)
        print(f"{'name':<40} {'input':>5}  weights")
        for r in rows:
            status = f"found: {r['weights']}" if r["weights"] else "not found"
            print(f"{r['name']:<40} {r['input'] or '?':>5}  {status}")
        print(f"{len(rows)} timm models match {a.timm!r}")
        return 0
    header = f"{'name':<18} {'params':>8} {'features':>8} {'input':>5} {'GFLOPs':>6}  weights"
    print(header)
    for name in list_backbones():
        b = get_backbone(name)
        where = weights_available(b)
        print(f"{name:<18} {b.num_params / 1e6:>7.1f}M {b.feature_dim:>8} {b.input_size:>5} {b.gflops_224:>6.2f}  "
              f"{_weights_status(b, where)}")
    return 0


def _weights_status(b, where: str | None) -> str:
    if b.weights is None:
        return "none (from scratch)"
    return f"found: {where}" if where else f"not found ({b.weights.filename})"


def cmd_cache(a) -> int:
    from headstart.runs.cache import cache_info, clear_cache

    info = clear_cache(a.cache_dir) if a.action == "clear" else cache_info(a.cache_dir)
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    parts = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in info["parts"].items() if size)
    if a.action == "clear":
        print(f"cache {info['path']} cleared: {info['bytes'] / 1e6:.1f} MB freed" + (f" ({parts})" if parts else ""))
        return 0
    if not info["exists"]:
        print(f"cache: {info['path']} does not exist yet (nothing cached)")
        return 0
    print(f"cache: {info['path']} ({info['bytes'] / 1e6:.1f} MB" + (f": {parts})" if parts else ")"))
    for s in info["namespaces"]:
        print(f"  features {s['namespace']}  {s['backbone']} {s['image_size']}px {s['engine']}/{s['precision']}: "
              f"{count(s['shards'], 'shard')}, {s['bytes'] / 1e6:.1f} MB")
    if info["converted_models"]:
        print(f"  engines: {count(info['converted_models'], 'converted backbone')}, "
              f"{info['parts']['engines'] / 1e6:.1f} MB")
    return 0


def cmd_datasets(a) -> int:
    from headstart.data.datasets import prepare

    kw = {k: v for k, v in (("per_class", a.per_class), ("test_per_class", a.test_per_class)) if v is not None}
    summary = prepare(a.name, a.out, progress=progress.enabled(), **kw)
    print(f"{a.name}: {summary['n_train']} train and {summary['n_test']} test images in {summary['out_dir']} "
          f"(from {summary['source']})")
    return 0


def cmd_export(a) -> int:
    from pathlib import Path

    from headstart.runs.export import export_onnx

    out = Path(a.out) if a.out else Path(a.run) / "onnx"
    path = export_onnx(a.run, out, opset=a.opset, dynamic_batch=a.dynamic_batch, overwrite=a.overwrite)
    print(f"{path}\n{path}.json")
    return 0


COMMANDS = {"train": cmd_train, "inspect": cmd_inspect, "extract": cmd_extract, "compare": cmd_compare, "evaluate": cmd_evaluate, "predict": cmd_predict,
            "serve": cmd_serve, "report": cmd_report, "backbones": cmd_backbones, "cache": cmd_cache, "datasets": cmd_datasets,
            "export": cmd_export}


# --- explain ---------------------------------------------------------------------------------

def _explain_parser(sub) -> None:
    ex = sub.add_parser("explain", help="heatmaps of where the model looked: per image, an overlay PNG and the raw "
                                        "map (.npy), named after the file")
    ex.add_argument("run", help="run directory or model bundle")
    ex.add_argument("inputs", nargs="+", help="image files and folders (searched recursively)")
    ex.add_argument("--class", dest="class_", metavar="NAME", default=None,
                    help="draw the map of this class (default: each image's predicted class)")
    ex.add_argument("--out", default=None, help="folder to write into (default RUN/explain); not inside an "
                                                "input folder")
    ex.add_argument("--json", action="store_true", help="print the rows and the skipped inputs as JSON")
    _engine_args(ex)


def cmd_explain(a) -> int:
    from headstart.runs.explain import explain_files

    rows, skipped = explain_files(a.run, a.inputs, a.out, class_=a.class_, runtime=_runtime(a))
    if a.json:
        print(json.dumps({"explained": rows, "skipped": skipped}, indent=2))
    else:
        for r in rows:
            print(f"{r['path']}\t{r['class']} {r['probability']:.3f}\t{r['overlay']}")
    if not rows:  # each skipped input was warned about as it was read
        print(f"headstart: error: none of the {len(skipped)} inputs could be explained (see the warnings above).",
              file=sys.stderr)
        return 2
    return 0


COMMANDS["explain"] = cmd_explain


def _setup_logging(quiet: bool, verbose: bool) -> None:
    logger = logging.getLogger("headstart")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if quiet else "[headstart] %(message)s"))
    logger.handlers[:] = [h for h in logger.handlers if not isinstance(h, logging.StreamHandler)
                          or isinstance(h, logging.FileHandler)]
    logger.addHandler(handler)
    logger.propagate = False


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe nobody reads any more (and not some other pipe that broke)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no poll here, or stdout is not a file: assume the pipe
        return True


@functools.cache
def _quick_exit() -> None:
    """At exit, skip the interpreter's last garbage collections over what torch, torchvision and scikit-learn
    loaded (`gc.freeze`, registered once per process; the process ends anyway, and everything it writes is
    closed, flushed and renamed before). Measured on the AMX machine (2026-12-01): a process that imported
    those three took 0.81 s to exit, 0.18 s frozen; a `train` or `evaluate` is one such exit each."""
    atexit.register(gc.freeze)


def main(argv: list[str] | None = None) -> int:
    _quick_exit()
    args = get_parser().parse_args(argv)
    progress.set_quiet(args.quiet)
    _setup_logging(args.quiet, args.verbose)
    try:
        with speaking_cli():  # errors name flags (--overwrite), not Python keywords (overwrite=True)
            code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's flush at exit
        return code
    except HeadstartError as exc:
        print(f"headstart: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a full disk, a permission, a missing file: the environment, not a bug
        if isinstance(exc, BrokenPipeError) and _stdout_reader_gone():
            # Python's docs, "Note on SIGPIPE": point stdout at /dev/null so the flush at exit does not
            # fail again. Everything the command did (a published run) stays; only the printing stopped.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        print(f"headstart: error: {exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}; check "
              "the path named, its permissions and the free space on its disk.", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        kept = exc.kept if isinstance(exc, Interrupted) else "nothing partial was kept."
        print(f"headstart: interrupted; {kept}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
