"""`charge-adapter`: the command line. Results go to stdout, diagnostics to stderr, meaning in the exit code.

Exit codes (`adapter.errors.ExitCode`, the README's table): 0 every FNA Procedure was coded or is non-billable by
rule; 1 something needs review (or, online, the server rejected a session's charges), or an unknown id in
explain/review ("no such ..."); 2 an input file, the FHIR server (host:port named) or the state could not be used
(the rest is still processed and reported; work not written stays queued); 3 a bad argument or configuration
value (the message names the option, or the file and the key).

Commands only parse options, build the parts and wire them; every adapter exception is turned into its
message and exit code in one place (`AdapterGroup`), so no command prints errors of its own.

One module per job: group.py (the group, its error handling, the context's parts), options.py (shared
options), offline.py (dry-run, explain), server.py (sync, reconcile, backfill), unattended.py (run, serve,
worklist, subscribe) with lifecycle.py (listener, loops, signals), status.py, review.py, tables.py (mue,
conformance). Importing this package registers every command on `cli`.
"""

import faulthandler
import signal

from adapter.cli import offline, review, server, status, tables, unattended  # noqa: F401  (they register their commands)
from adapter.cli.group import cli
from adapter.cli.offline import output_bundle

__all__ = ["cli", "main", "output_bundle"]


def main() -> None:
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>`: every thread's stack to stderr, for a hung process
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    cli(prog_name="charge-adapter")
