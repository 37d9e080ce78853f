"""`python -m headstart ...` is the `headstart` command, so torchrun can start it: `torchrun ... -m headstart train ...`."""

import sys

from headstart.cli import main

if __name__ == "__main__":
    sys.exit(main())
