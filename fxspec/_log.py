"""The ``fxspec`` logger and the rewrite counters.

Every rewrite bumps a named counter (``counters["quantize"]["int8"] += 1``), so tests can assert that
a pass fired, and that it did not. ``reset_counters()`` clears them between tests.
"""

from __future__ import annotations

import collections
import logging

log = logging.getLogger("fxspec")


class FxspecWarning(UserWarning):
    """fxspec did less than the config asked (a lossy pass applied to nothing, a calibration file covers only
    some layers, a fallback to plain Inductor). ``strict = true`` raises instead where a config is at fault."""

#: counters[category][name] -> int, e.g. counters["backend"]["fallback"], counters["graph"]["ffn.gated"]
counters: collections.defaultdict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def reset_counters() -> None:
    counters.clear()


def set_level(level: str) -> None:
    log.setLevel(level.upper())
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[fxspec %(levelname)s] %(message)s"))
        log.addHandler(handler)
