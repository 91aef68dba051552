"""``"package.module:attr.sub"`` -> the object it names: one resolver for every place a spec like this is
read (the CLI's MODEL factories, user passes named in a config)."""

from __future__ import annotations

import importlib
from typing import Any


class MissingAttribute(AttributeError):
    """The module imported but has no such attribute (an AttributeError raised while importing is not this)."""


def import_object(spec: str) -> tuple[Any, Any]:
    """``(module, object)`` for ``"module:attr[.attr...]"``. The module's import errors propagate as they are;
    a missing attribute raises :class:`MissingAttribute` naming it."""
    mod_name, _, attr = spec.partition(":")
    module = importlib.import_module(mod_name)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise MissingAttribute(f"module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return module, obj
