"""Which SAELens method is running further up the call stack (SAELens gives its SAEs no other way to know)."""

from __future__ import annotations

import sys
from types import CodeType, FrameType


def running_frame(code: CodeType, max_depth: int) -> FrameType | None:
    """The nearest frame running ``code`` among the ``max_depth`` frames above the caller's caller, or None."""
    frame = sys._getframe(2)
    for _ in range(max_depth):
        frame = frame.f_back
        if frame is None:
            return None
        if frame.f_code is code:
            return frame
    return None
