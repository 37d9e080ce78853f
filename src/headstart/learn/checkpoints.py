"""Where a fine-tuning run keeps its checkpoints: beside the run directory, so they survive a kill.

The run directory appears only when complete (runs/rundir.py); `--resume` finds the last
checkpoint and the settings the run was started with here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from headstart.fileio import write_json


def checkpoint_dir(final: Path) -> Path:
    """Beside the run, not inside it: the run directory appears only when complete, checkpoints survive a kill."""
    return final.with_name(final.name + ".checkpoints")


def start_checkpoints(final: Path, config: dict, resume: bool) -> Path:
    """The checkpoint folder of a fine-tuning run, fresh (or kept with `resume`), holding the run's settings."""
    folder = checkpoint_dir(final)
    if not resume:
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    write_json(folder / "config.json", config)
    return folder
