"""The package's one error class.

Every error a user can cause is raised as ``LmlabError`` with one sentence that says what
to do. The CLI prints that sentence (no traceback unless ``--debug``) and exits with
``exit_code``.
"""

from __future__ import annotations

import difflib
import errno


class LmlabError(Exception):
    """A user-facing error: ``str(err)`` is one sentence that names the fix."""

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def suggest(name: str, choices, n: int = 3) -> str:
    """' Did you mean: a, b?' for the close matches of ``name``, or '' when none are close."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def write_failure(e: OSError) -> str:
    """Why a write failed, for a sentence: "the disk is full" (no space, quota, file too large) or the OS's words."""
    return "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else (e.strerror or str(e))
