"""User-facing errors. Each carries one line that names the file or tensor and the fix.

The CLI prints ``lwq-gguf: error: <message>`` and exits with ``exit_code``; it never shows a
traceback for these.
"""


class LwqError(Exception):
    """Base class: a problem the user can fix. ``str(err)`` is the one-line message."""

    exit_code = 2


class ModelInputError(LwqError):
    """The Hugging Face model folder is missing, incomplete or corrupt."""


class UnsupportedModelError(LwqError):
    """The model's architecture is not one lwq-gguf can score and convert."""


class PlanError(LwqError):
    """The bit budget, type ladder or overrides cannot be satisfied."""


class OutputError(LwqError):
    """The output cannot be written (exists, unwritable folder, disk full)."""


class ToolError(LwqError):
    """The pinned llama.cpp build is missing or one of its tools failed."""

    exit_code = 3


class VerifyError(LwqError):
    """The written file does not match its plan or llama.cpp cannot run it."""

    exit_code = 4
