"""`--strategy ensemble` (and auto's ensemble) inside a run: members trained, averaged, scored, written.

Each member is an ordinary run written into `<run>/members/<name>` (config, metrics, history,
bundle, reports), on the same data, split and seed: "fine-tune" with the run's fine-tuning
settings (`--epochs`, default EnsembleSettings.finetune_epochs), then "scratch", the small CNN at
the images' native size with the scratch strategy's settings (`--scratch-epochs`). The run's own
model folder is the ensemble bundle (bundle.py: `members/0`, `members/1`), and its test split is
scored by that bundle loaded back, as `evaluate` scores it.

Auto (auto.choose_ensemble, auto.keep_ensemble): the first member runs with strategy auto; if it
does not fine-tune, no scratch member is trained; if the average does not beat it on validation,
the run's model is that member alone. Either way the members' runs stay in `members/`.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np

from headstart import distributed
from headstart.strategies.auto import choose_ensemble, keep_ensemble, val_scores
from headstart.models.bundle import load
from headstart.models.bundle import save as save_bundle
from headstart.data.folders import ImageData
from headstart.models.ensemble import AVERAGING, Ensemble
from headstart.fileio import write_json
from headstart.reports.metrics import compute_metrics
from headstart.models.model import features_of
from headstart.learn.checkpoints import checkpoint_dir
from headstart.settings import SCRATCH_DEFAULTS, ENSEMBLE, TrainConfig
from headstart.strategies.registry import configure

log = logging.getLogger("headstart")

MEMBERS = "members"


def plan_ensemble(cfg: TrainConfig, data: ImageData, median_side: float | None) -> dict:
    """Whether this run trains an ensemble: always for --strategy ensemble, by auto's rule (on the images'
    median shorter side and the smallest class) for auto."""

    if cfg.strategy == "ensemble":  # torchrun was refused before (runs/context.world_check: its entry says so)
        return {"ensemble": True, "reasons": ["asked for (--strategy ensemble)"], "measurements": {}}
    counts = np.bincount([s.label for s in data.split("train")], minlength=len(data.classes))
    per_class = int(counts[counts > 0].min()) if counts.any() else 0
    world = distributed.world_size() if not cfg.resume else 2  # a resumed run continues a plain run
    decision = choose_ensemble(median_side, per_class, world)
    if cfg.resume:
        decision["reasons"] = ["no ensemble when resuming a run (its checkpoint is of one model)"]
    log.info("strategy auto, ensemble: %s", "; ".join(decision["reasons"]))
    return decision


def member_settings(cfg: TrainConfig) -> list[tuple[str, dict]]:
    """(name, train() settings) of each member, sharing the run's data, split, seed and runtime."""
    shared = {k: getattr(cfg, k) for k in ("labels", "val_fraction", "test_fraction", "seed", "head",
                                           "class_weight", "batch_size", "workers", "device", "engine",
                                           "precision", "cache_dir", "strict", "tensorboard", "tta")}
    given = {k: getattr(cfg.finetune, k) for k in cfg.finetune_given}
    epochs = cfg.finetune.epochs if cfg.strategy == "ensemble" or "epochs" in given else ENSEMBLE.finetune_epochs
    first = dict(shared, strategy="fine-tune" if cfg.strategy == "ensemble" else "auto", backbone=cfg.backbone,
                 weights=cfg.weights, image_size=cfg.image_size, finetune={**given, "epochs": epochs})
    scratch = dict(shared, strategy="scratch", image_size="auto",  # the small CNN at the images' native size
                   finetune={**SCRATCH_DEFAULTS, "epochs": cfg.scratch_epochs})
    return [("fine-tune", first), ("scratch", scratch)]


def train_member(cfg: TrainConfig, name: str, settings: dict, place, run_member):
    """One member as an ordinary run in `<out>/members/<name>` (training.run_member); its checkpoints stay
    inside the partial run and are removed once it is done."""
    mcfg = configure(TrainConfig(data=cfg.data, **settings))
    sub = place.out / MEMBERS / name
    sub.mkdir(parents=True, exist_ok=True)
    log.info("ensemble member %s: strategy %s, backbone %s", name, mcfg.strategy, mcfg.backbone)
    run = run_member(mcfg, place.cache_root, sub)
    shutil.rmtree(checkpoint_dir(sub), ignore_errors=True)
    run.config["out"] = str(place.final / MEMBERS / name)  # where it will be once the run is published
    write_json(sub / "config.json", run.config)
    return run


def train_ensemble(cfg: TrainConfig, decision: dict, data: ImageData, place, run_member) -> dict:
    """The ensemble run: members, their average (kept or not, for auto) and its test scores, in `place` (out,
    final, cache_root: runs/context.Place). Returns what the run writes: config, metrics, model, skipped,
    splits (splits.csv's text) and test (paths, labels, probabilities). `run_member(cfg, cache_root, folder)`
    trains one member as a run (runs/train.run_member: passed in, so that strategies need no runs/)."""
    out, final = place.out, place.final
    settings = member_settings(cfg)
    runs, walls = {}, {}
    for name, s in settings:
        t0 = time.perf_counter()
        runs[name] = train_member(cfg, name, s, place, run_member)
        walls[name] = round(time.perf_counter() - t0, 2)
        if name == "fine-tune" and cfg.strategy == "auto" and runs[name].config["resolved_strategy"] != "fine-tune":
            decision = {**decision, "ensemble": False, "reasons": decision["reasons"] + [
                f"no scratch member: auto chose {runs[name].config['resolved_strategy']} for the first member"]}
            break
    first = runs["fine-tune"]
    runtime = cfg.runtime
    val_paths, y_val = _split(data, "val", first.model.classes)
    members_info, kept = [], False
    if len(runs) > 1:
        ensemble = Ensemble([r.model for r in runs.values()], names=list(runs))
        save_bundle(ensemble, out / "model")
        ensemble = load(out / "model")
        feats, failures = features_of(ensemble, val_paths, runtime, desc="val (ensemble)")
        y = y_val[[p not in failures for p in val_paths]]
        probas = ensemble.member_probas(feats)
        scores = {"ensemble": val_scores(y, np.mean(probas, axis=0))}
        for (name, run), p in zip(runs.items(), probas):
            members_info.append(_member_info(name, run, val_scores(y, p), walls[name]))
        kept, why = (True, "asked for (--strategy ensemble)") if cfg.strategy == "ensemble" else \
            keep_ensemble(members_info[0]["val"], scores["ensemble"])
        log.info("ensemble: validation accuracy %.4f, log loss %.4f (members: %s); %s",
                 scores["ensemble"]["accuracy"], scores["ensemble"]["log_loss"],
                 ", ".join(f"{m['name']} {m['val']['accuracy']:.4f} / {m['val']['log_loss']:.4f}"
                           for m in members_info), why)
        decision = {**decision, "kept": kept, "reasons": decision["reasons"] + [why],
                    "measurements": {**decision["measurements"], "val_ensemble": scores["ensemble"],
                                     **{f"val_{m['name']}": m["val"] for m in members_info}}}
    if not kept:  # auto: the first member alone is the run's model
        shutil.rmtree(out / "model", ignore_errors=True)
        shutil.copytree(first.run_dir / "model", out / "model")
    model = load(out / "model")

    test_paths, y_test = _split(data, "test", model.classes)
    proba = None
    if test_paths:
        feats, failures = features_of(model, test_paths, runtime, desc="test")
        keep = [p not in failures for p in test_paths]
        test_paths, y_test = [p for p, k in zip(test_paths, keep) if k], y_test[np.array(keep, dtype=bool)]
        proba = model.proba_from_features(feats)
    metrics = _metrics(first, runs, members_info, scores["ensemble"] if members_info else None,
                       (y_test, proba, model))
    config = _config(cfg, first, decision, model, final)
    if members_info:
        config["ensemble"] = {"members": [{k: m[k] for k in ("name", "strategy", "backbone", "image_size", "tta",
                                                             "run")} for m in members_info],
                              "averaging": AVERAGING, "kept": kept,
                              "scratch_epochs": cfg.scratch_epochs,
                              "finetune_epochs": settings[0][1]["finetune"]["epochs"]}
    return {"config": config, "metrics": metrics, "model": model, "skipped": _union_skipped(runs.values()),
            "splits": (first.run_dir / "splits.csv").read_text(encoding="utf-8"),  # the same split for every member
            "test": (test_paths, y_test, proba)}


def _split(data: ImageData, split: str, classes: list[str]) -> tuple[list[str], np.ndarray]:
    """Paths and class columns of a split's images whose class the model knows."""
    index = {c: i for i, c in enumerate(classes)}
    pairs = [(s.path, index[data.classes[s.label]]) for s in data.split(split) if data.classes[s.label] in index]
    return [p for p, _ in pairs], np.array([c for _, c in pairs], dtype=np.int64)


def _member_info(name: str, run, val: dict, wall: float) -> dict:
    test = run.metrics.get("test") or {}
    return {"name": name, "strategy": run.config["resolved_strategy"], "backbone": run.config["backbone"],
            "image_size": run.config["image_size"], "tta": run.model.tta, "run": f"{MEMBERS}/{name}",
            "val": val, "wall_seconds": wall, "test_accuracy": test.get("accuracy")}


def _metrics(first, runs: dict, members_info: list, ens_val: dict | None, test: tuple) -> dict:
    """metrics.json: the kept model's validation and test scores, and each member's (metrics["ensemble"]);
    `test` is (labels, probabilities, model) of the test split, the model the ensemble when it was kept. The
    caller adds the run's wall time."""
    y_test, proba, model = test
    kept = isinstance(model, Ensemble)
    m = first.metrics
    metrics = {k: m[k] for k in ("duplicates_across_splits", "extraction", "n_train", "n_val", "n_test") if k in m}
    metrics["head_seconds"] = round(sum(r.metrics.get("head_seconds", 0) for r in runs.values()), 2)
    if kept:
        metrics["val_accuracy"], metrics["val_log_loss"] = ens_val["accuracy"], ens_val["log_loss"]
    else:  # the first member alone: its own numbers
        metrics["val_accuracy"] = m.get("val_accuracy")
        if "fine_tune" in m:
            metrics["fine_tune"] = m["fine_tune"]
    if y_test is not None and len(y_test):
        metrics["test"] = compute_metrics(y_test, proba, model.classes)
        log.info("test accuracy %.4f on %d images (%s)", metrics["test"]["accuracy"], metrics["test"]["n_images"],
                 "ensemble" if kept else "the first member alone")
    if members_info:
        metrics["ensemble"] = {"kept": kept, "val": ens_val, "members": members_info,
                               "test_accuracy": metrics.get("test", {}).get("accuracy") if kept else None}
    return metrics


def _config(cfg: TrainConfig, first, decision: dict, model, final: Path) -> dict:
    """config.json: the first member's resolved config (data, engine, classes ...) with the run's own settings;
    `model` is the run's model (the ensemble when it was kept, else the first member)."""
    kept = isinstance(model, Ensemble)
    config = dict(first.config)
    asked = cfg.to_dict()  # the rest (engine, weights, image size, ...) is the first member's, as resolved
    config.update({k: asked[k] for k in ("strategy", "finetune", "scratch_epochs", "tta", "backbone")})
    config.update(out=str(final), resolved_strategy="ensemble" if kept else first.config["resolved_strategy"],
                  strategy_decision=decision if cfg.strategy == "auto" else first.config["strategy_decision"],
                  resolved_tta=model.tta, command=first.config["command"])
    if cfg.strategy == "auto" and first.config.get("strategy_decision"):
        decision["first_member"] = first.config["strategy_decision"]  # auto's fine-tune or not, and why
    if kept:
        config["image_size_reason"] = "per member: " + model.describe()
        config["tta_decision"] = {"tta": model.tta, "measurements": {}, "reasons": [
            "each member keeps its own test-time views (see members/<name>/config.json)"]}
    return config


def _union_skipped(runs) -> list[dict]:
    seen, out = set(), []
    for r in runs:
        for item in r.skipped:
            if item["path"] not in seen:
                seen.add(item["path"])
                out.append(item)
    return out
