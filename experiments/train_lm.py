"""Train a decoder LM; the same as the `attnzoo-train` command (see `--help`)."""

import sys

from attnzoo.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
