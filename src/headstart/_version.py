"""The package version, in a module of its own so that any module can import it without the package's
`__init__` (which imports most modules: importing it from one of them made an import cycle).

`source_commit()` adds the commit of the code when headstart runs from a git checkout (an editable
install, or `src` on PYTHONPATH), where "0.1.0" names every commit alike. A run records it at train
time (config.json's `versions`), so an old run's report shows the code that produced it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

__version__ = "0.1.0"


def source_commit() -> str | None:
    """The commit of the checkout holding this package, "+ changes" when its files differ from it; None when the
    package is not a tracked part of a git checkout (a wheel in site-packages) or git is not there to ask."""
    here = Path(__file__).resolve().parent
    # Reading only: no index refresh written into the user's checkout by `git status`.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10, env=env)

    try:
        # The package itself tracked, not merely a venv's site-packages inside some other repository.
        if git("ls-files", "--error-unmatch", "--", "__init__.py").returncode != 0:
            return None
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        status = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None
    commit = head.stdout.strip()
    return f"{commit} + changes" if status.returncode == 0 and status.stdout.strip() else commit
