"""The folder transport: each message as one file, for engines that pick charges up from a folder.

A file appears complete or not at all: it is written under a hidden temporary name, flushed to disk and
renamed to `<sequence>-<control id>.hl7` (the sequence is the ledger's, zero-padded, so sorting the names is
the order the messages were planned in). Segments end with CR, as on the wire. A written file counts as
acknowledged; a process that dies before recording that writes the same file again (same name, same bytes).
"""

from __future__ import annotations

import os
from pathlib import Path

from adapter.hl7v2.mllp import Ack, TransportError


class FolderTransport:
    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.where = f"folder {self.folder}"

    def file_name(self, seq: int, control_id: str) -> str:
        return f"{seq:012d}-{control_id}.hl7"

    def send(self, text: str, control_id: str, seq: int = 0) -> Ack:
        name = self.file_name(seq, control_id)
        temporary = self.folder / f".{name}.tmp"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with temporary.open("wb") as handle:
                handle.write(text.encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.folder / name)
            directory = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(directory)  # the rename itself must survive a power loss
            finally:
                os.close(directory)
        except OSError as exc:
            raise TransportError(f"{self.where}: cannot write {name} ({exc.strerror or exc})", sent=False) from None
        return Ack("written", control_id, name)

    def close(self) -> None:
        return None
