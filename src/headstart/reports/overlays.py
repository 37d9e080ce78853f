"""The worst errors' heatmaps in report.html: for each mistake shown, where the run's model looked for the
class it predicted and for the true class, drawn over the image side by side.

The maps are the ones `headstart explain` draws (Model.explain_classes, heatmaps/): CAM for a linear head,
Grad-CAM through any other head, an ensemble's members averaged, test-time flips mirrored back; both of an
image's maps come from one pass of its backbone. Only the mistakes the page shows (html.WORST) are
explained, CHUNK images at a time: a map is as large as its image (48 MB for a 12-megapixel photo).

They run in eager torch, fp32, on the CPU, with no disk cache: for a dozen images that costs a second or
two where a converted engine would first spend longer on its export, and the same arithmetic every time
keeps the page `headstart report` rebuilds the one the run wrote. A run whose model cannot be loaded or
run now (its files moved or damaged, a class it no longer knows) still gets its report, with one line
saying why the maps are missing.
"""

from __future__ import annotations

import logging
from pathlib import Path

from headstart.errors import HeadstartError
from headstart.heatmaps.overlay import thumbnail
from headstart.models.bundle import load
from headstart.settings import Runtime

log = logging.getLogger(__name__)

CHUNK = 4
RUNTIME = Runtime(device="cpu", engine="torch", precision="fp32", cache_dir="none", batch_size=CHUNK)
FAILURES = (HeadstartError, OSError, ValueError, RuntimeError, KeyError)  # a model that cannot load or run


def worst_overlays(run_dir: Path, shown: list[dict], side: int) -> tuple[list[tuple | None], str | None]:
    """Per mistake shown ({path, predicted, true}), the pair (predicted class's overlay, true class's overlay)
    as PIL images at most `side` pixels a side, or None where the image cannot be read now; and, when no map
    could be drawn at all, why (else None)."""
    from headstart.data.images import ImageError, load_image

    if not shown:
        return [], None
    try:
        model = load(run_dir / "model")
    except FAILURES as exc:
        log.warning("report: no heatmaps of the worst errors: %s", exc)
        return [None] * len(shown), f"the run's model could not be loaded ({exc})"
    pairs: list[tuple | None] = []
    for s in range(0, len(shown), CHUNK):
        part = shown[s:s + CHUNK]
        try:
            explained = model.explain_classes([w["path"] for w in part], [[w["predicted"], w["true"]] for w in part],
                                              RUNTIME)
        except FAILURES as exc:
            log.warning("report: no heatmaps of the worst errors: %s", exc)
            return [None] * len(shown), f"the run's model could not draw them ({exc})"
        for w, (predicted, true) in zip(part, explained):
            if not predicted.ok:
                pairs.append(None)
                continue
            try:  # a reduced decode is enough: the map covers the whole image at any size
                image = load_image(w["path"], min_side=side)
            except (ImageError, OSError):  # changed since it was explained
                pairs.append(None)
                continue
            pairs.append((thumbnail(image, predicted.map, side), thumbnail(image, true.map, side)))
    return pairs, None
