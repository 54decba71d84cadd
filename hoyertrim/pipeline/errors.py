"""What a stage raises: a request it cannot run (`StageError`, one line at the command line), a
folder holding another run (`StageConflict`), an interruption it cleaned up after
(`StageInterrupted`)."""

from __future__ import annotations

import pathlib
from typing import Sequence

__all__ = ["StageConflict", "StageError", "StageInterrupted"]


class StageError(ValueError):
    """A stage cannot run as asked (bad input, a directory holding another run); the message
    says what to do. The command line prints it as one line."""


class StageConflict(StageError):
    """The stage's folder holds a run with other settings (``differences``: what differs)."""

    def __init__(self, directory: pathlib.Path, differences: Sequence[str]):
        super().__init__(f"{directory} holds another run ({'; '.join(differences[:3])}); "
                         "choose another --out or delete it.")
        self.directory, self.differences = directory, list(differences)


class StageInterrupted(KeyboardInterrupt):
    """A stage ended by Ctrl-C or SIGTERM after cleaning up: ``resumable`` says whether it left
    work that running the same command again continues from (its manifest then says
    ``interrupted``); otherwise nothing of it was left in ``directory``."""

    def __init__(self, directory: pathlib.Path, resumable: bool):
        super().__init__(str(directory))
        self.directory, self.resumable = directory, resumable
