# PYTHON_ARGCOMPLETE_OK  (argcomplete's global completion looks for it here: the console
# script `trainer` runs stepstream.cli:main, and argcomplete reads this package's __init__)
"""The `trainer` command's client side: submit, jobs, show, watch, cancel, download, plot,
health, validate (no server, no TensorFlow), experiment (submit, watch, show, list, cancel,
plot) and completion. The server's commands (serve, worker, migrate, train, ...) are added by
the service package through the `stepstream.commands` entry points, and on a client-only
install say which extra to install.

Data goes to stdout (`-o table|json|yaml` on the commands that read); progress, messages and
errors go to stderr. Jobs are named by id, a unique id prefix, or a unique display name.

commands          the client's commands, the parser, `main`
experiments       `trainer experiment ...`: its commands and the follow loop
experiment_views  trials as tables, an experiment's header, the live view
experiment_plot   trial curves and parallel coordinates (matplotlib)
output            human times and numbers, tables, JSON and YAML
progress          the progress bar and how events print around it
spec_files        job and experiment files read and validated, problems at their lines
names             a job or an experiment named by id prefix or display name
errors            exit codes, CliError, what a failed RPC prints
remote            the default address and a client from the connection flags
completion        shell completion (argcomplete)"""

from stepstream.cli.commands import main

__all__ = ["main"]
