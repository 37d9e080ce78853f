"""The check `train` runs on the features it has already computed: many likely label errors, or any train/test
leak, said in the log and the report with the command that lists them (`headstart inspect`). Off with
--no-data-check.

It is cheap by design, a few seconds where `inspect` takes a minute:
- labels: each training or validation image's NEIGHBOURS nearest others (learn/neighbours.py, itself left
  out) vote; an image whose given class gets at most GIVEN_VOTES of the votes while one other class gets
  at least OTHER_VOTES is a likely label error. The run warns when they are at least WARN_SHARE of the
  images (and at least WARN_MIN). On FMNIST-TL's features (128 px) 1.2% of the training and validation
  images are such suspects as they come (its shirts and T-shirts), 4.1% with 5% of the labels moved to
  another class (3.1% of them moved ones); the votes 1 and 7 gave 2.8% and 6.2%, too near to tell apart;
- leaks: each validation or test image's nearest training image in feature space, when at least
  LEAK_FLOOR similar, is decoded with it and compared as pictures (data/looks.py, as `inspect` does);
  a pair whose spectra reach COPY_SIM is a leak. Features find re-saved copies this way; `inspect` also finds
  the shifted and cropped ones, with a pixel search this check does not make.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from headstart.data.looks import COPY_SIM, look_all, spectrum_similarity, unit_spectra
from headstart.learn.neighbours import nearest, normalised
from headstart.progress import count

log = logging.getLogger("headstart")

NEIGHBOURS = 10
GIVEN_VOTES = 0
OTHER_VOTES = 8
WARN_SHARE = 0.025
WARN_MIN = 10
LEAK_FLOOR = 0.9



def check_data(ctx) -> dict:
    """The check on a prepared run (runs/context.RunContext); logs a warning when it finds something."""
    t0 = time.perf_counter()
    feats = ctx.feats
    X, y = feats.X, feats.y
    known = np.flatnonzero(feats.tr | feats.va)
    Xn = normalised(X)
    suspects = []
    if len(known) > NEIGHBOURS:
        _, nb = nearest(Xn[known], NEIGHBOURS, normalise=False)
        votes = y[known][nb]  # (n, k) classes of the neighbours
        mine = (votes == y[known][:, None]).sum(axis=1)
        top = np.array([np.bincount(v, minlength=len(feats.classes)).max() for v in votes])
        suspects = known[(mine <= GIVEN_VOTES) & (top >= OTHER_VOTES)]
    leaks = _leaks(ctx, Xn)
    share = len(suspects) / max(1, len(known))
    many = len(suspects) >= WARN_MIN and share >= WARN_SHARE
    command = f"headstart inspect {ctx.cfg.labels and '--labels ' + ctx.cfg.labels + ' ' or ''}{ctx.cfg.data}"
    result = {"likely_label_errors": int(len(suspects)), "share": round(share, 4), "many_label_errors": bool(many),
              "leaks": len(leaks), "leak_examples": leaks[:5], "command": command,
              "seconds": round(time.perf_counter() - t0, 2)}
    if many:
        log.warning("data check: %s of %d training and validation images (%.1f%%) look mislabelled to their nearest "
                    "neighbours; `%s` lists the likely wrong labels, and `train --exclude` leaves them out.",
                    count(len(suspects), "image"), len(known), 100 * share, command)
    if leaks:
        log.warning("data check: %s of the validation and test splits %s a near copy in train (e.g. %s = %s): the "
                    "test score is inflated. `%s` lists them.", count(len(leaks), "image"),
                    "has" if len(leaks) == 1 else "have", leaks[0]["image"], leaks[0]["train_copy"], command)
    log.info("data check: %d likely label errors, %d leaks in %.1fs", len(suspects), len(leaks), result["seconds"])
    return result


def _leaks(ctx, Xn: np.ndarray) -> list[dict]:
    feats = ctx.feats
    train = np.flatnonzero(feats.tr)
    held = np.flatnonzero(feats.va | feats.te)
    if not len(train) or not len(held):
        return []
    sims, nb = nearest(Xn[train], 1, Xn[held], normalise=False)
    close = np.flatnonzero(sims[:, 0] >= LEAK_FLOOR)
    if not len(close):
        return []
    pairs = [(held[i], train[nb[i, 0]]) for i in close]
    paths = sorted({feats.samples[i].path for pair in pairs for i in pair})
    looks, _ = look_all(paths)
    by_path = dict(zip(paths, looks))
    ok = [(a, b) for a, b in pairs if by_path[feats.samples[a].path] and by_path[feats.samples[b].path]]
    if not ok:
        return []
    fa = np.stack([by_path[feats.samples[a].path].finger for a, _ in ok])
    fb = np.stack([by_path[feats.samples[b].path].finger for _, b in ok])
    sim = spectrum_similarity(unit_spectra(fa), unit_spectra(fb))
    return [{"image": feats.samples[a].path, "split": feats.samples[a].split, "train_copy": feats.samples[b].path,
             "similarity": round(float(s), 4)} for (a, b), s in zip(ok, sim) if s >= COPY_SIM]
