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
conformance). A command's module is imported when the command is looked up (`group.COMMAND_MODULES`), so
`dry-run` does not pay for loading the service, the FHIR client or the state.
"""

import faulthandler
import signal
from typing import Any

from adapter.cli.group import cli

__all__ = ["cli", "main", "output_bundle"]


def __getattr__(name: str) -> Any:
    if name == "output_bundle":  # the offline Bundle writer, used by tests and benches
        from adapter.cli.offline import output_bundle

        return output_bundle
    raise AttributeError(f"module 'adapter.cli' has no attribute {name!r}")


def main() -> None:
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>`: every thread's stack to stderr, for a hung process
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    cli(prog_name="charge-adapter")
