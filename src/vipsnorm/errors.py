"""One small exception hierarchy: every message names the file, the cause and, where possible, the fix."""

from __future__ import annotations

import os

__all__ = [
    "VipsnormError",
    "UnreadableImageError",
    "UnsupportedImageError",
    "ImageTooLargeError",
    "NoTissueError",
    "FlatImageError",
    "OutputError",
    "InvalidReferenceError",
    "StainSeparationError",
    "one_line",
]


def one_line(message: str) -> str:
    """Condense a (libvips, multi-line) error message into one line."""
    parts = [p.strip().rstrip(";").strip() for p in str(message).splitlines()]
    seen: list[str] = []
    for p in parts:
        # pyvips prefixes "unable to call <operation>" / "unable to load from file b'...'": noise.
        if p and not p.startswith(("unable to call", "unable to load from file")) and p not in seen:
            seen.append(p)
    return "; ".join(seen) or str(message).strip()


class VipsnormError(Exception):
    """Base class: ``str(err)`` is ``"<path>: <cause>"`` on one line."""

    def __init__(self, path: str | os.PathLike[str] | None, cause: str):
        self.path = None if path is None else os.fspath(path)
        self.cause = one_line(cause)
        super().__init__(self.cause if self.path is None else f"{self.path}: {self.cause}")

    def about(self, path: str | os.PathLike[str]) -> "VipsnormError":
        """This error, naming ``path`` if it names no file yet (methods raise without knowing the file)."""
        return self if self.path is not None else type(self)(path, self.cause)


class UnreadableImageError(VipsnormError):
    """The file is missing, empty, corrupt or truncated: its pixels cannot be decoded."""


class UnsupportedImageError(VipsnormError):
    """The file decodes, but holds something vipsnorm does not normalize (format, bands, dtype)."""


class ImageTooLargeError(VipsnormError):
    """The image claims more pixels than the configured limit."""


class NoTissueError(VipsnormError):
    """A slide where no tissue was found (all glass): there is nothing to fit on."""


class FlatImageError(VipsnormError):
    """Every sampled pixel has the same value: there is nothing to normalize."""


class OutputError(VipsnormError):
    """The output cannot be written (it would overwrite an input, the folder is missing, ...)."""


class InvalidReferenceError(VipsnormError):
    """A reference (JSON or image) cannot be used with the requested method."""


class StainSeparationError(VipsnormError):
    """The tissue does not hold two separable stains (H&E methods): one stain only, or no spread."""
