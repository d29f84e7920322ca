# PYTHON_ARGCOMPLETE_OK  (argcomplete's completion of `python -m stepstream.cli` looks here)
"""`python -m stepstream.cli`: the `trainer` command."""

import sys

from stepstream.cli.commands import main

if __name__ == "__main__":
    sys.exit(main())
