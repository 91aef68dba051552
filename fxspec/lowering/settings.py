"""Kernel settings: the process-wide :class:`fxspec.config.KernelsConfig` that the launchers read.

Every launch reads :func:`current` (programmatic dependent launch, the L2 prefetch under it, the int4
packed GEMV, the per-GPU config tables, the decode-attention combine), so a benchmark can flip a switch
between two CUDA-graph captures and measure both in one run::

    from fxspec.lowering import settings
    with settings.override(pdl="off"):
        graph_without_pdl = capture(step)      # kernels launched (and captured) here run without PDL

Sources, in the order they take effect:

1. the ``[kernels]`` section of the TOML file that ``$FXSPEC_CONFIG`` names, read on first use (the
   no-code way to change a setting; defaults without it);
2. :func:`apply` -- the backend applies each compiled graph's ``config.kernels`` (the most recent compile
   wins);
3. :func:`override` -- a block of code with some keys changed, the previous settings restored after.

Values are validated by :class:`~fxspec.config.KernelsConfig`: an unknown key or a bad value raises
:class:`fxspec.ConfigError` naming it.
"""

from __future__ import annotations

import contextlib
import difflib
from dataclasses import asdict, fields, replace
from typing import Any, Iterator, Optional

from ..config import ConfigError, KernelsConfig, load_config

__all__ = ["current", "apply", "override", "reset"]

_BASE: Optional[KernelsConfig] = None  # from $FXSPEC_CONFIG, then from apply()
_OVERRIDES: list[dict] = []  # the open override() blocks, innermost last
_CURRENT: Optional[KernelsConfig] = None  # _BASE with the overrides on top (cached)


def current() -> KernelsConfig:
    """The settings kernels launch with now (initialised on first use from ``$FXSPEC_CONFIG``'s
    ``[kernels]`` section, or the defaults). Treat it as read-only; change it with :func:`apply` or
    :func:`override`."""
    global _CURRENT
    if _CURRENT is None:
        base = _base()
        _CURRENT = KernelsConfig(**{k: v for d in [asdict(base), *_OVERRIDES] for k, v in d.items()}) \
            if _OVERRIDES else base
    return _CURRENT


def _base() -> KernelsConfig:
    global _BASE
    if _BASE is None:
        _BASE = load_config().kernels
    return _BASE


def apply(cfg: KernelsConfig) -> None:
    """Make ``cfg`` the process-wide settings (the backend calls it with each compiled graph's config).
    Keys set by an open :func:`override` block stay as that block set them until it ends: a graph compiled
    inside ``with override(pdl="off"):`` launches without PDL there."""
    global _BASE, _CURRENT
    if not isinstance(cfg, KernelsConfig):
        raise ConfigError(f"kernel settings must be a KernelsConfig (fxspec.config), got {type(cfg).__name__}")
    _BASE = replace(cfg)  # a copy: later changes to the caller's object do not leak into launches
    _CURRENT = None


def reset() -> None:
    """Forget the settings; the next :func:`current` reads ``$FXSPEC_CONFIG`` again."""
    global _BASE, _CURRENT
    _BASE = _CURRENT = None


@contextlib.contextmanager
def override(**changes: Any) -> Iterator[KernelsConfig]:
    """Launch with ``changes`` applied to the current settings inside the block (validated as a
    :class:`~fxspec.config.KernelsConfig`); the previous settings come back afterwards, also on an
    exception. Yields the settings in effect."""
    global _CURRENT
    valid = [f.name for f in fields(KernelsConfig)]
    for key in changes:
        if key not in valid:
            near = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ConfigError(f"unknown key '{key}' in the [kernels] section{hint}\n"
                              f"valid keys: {', '.join(sorted(valid))}")
    new = KernelsConfig(**{**asdict(current()), **changes})  # validates before anything changes
    _OVERRIDES.append(dict(changes))
    _CURRENT = new
    try:
        yield new
    finally:
        _OVERRIDES.pop()
        _CURRENT = None
