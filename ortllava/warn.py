"""Warnings from inside ortllava, attributed to the caller's code: the first frame outside this package, however
deep in it the warning arises (a chat turn, a stream's generator, a load)."""

from __future__ import annotations

import os
import sys
import warnings

_PACKAGE = os.path.dirname(__file__) + os.sep  # (not resolved: code loaded through a symlink names its files so)


class GenerationWarning(UserWarning):
    """A warning about one call's arguments or length (a prompt that leaves the default answer less room, sampling
    arguments without sampling, ...): each call that meets the case warns again, so a server may filter them by this
    category (`warnings.filterwarnings("ignore", category=ortllava.GenerationWarning)`)."""


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn(message, category)` at the first caller outside ortllava."""
    frame, level = sys._getframe(1), 2  # (level 1 is this function; 2 the code that called it)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
