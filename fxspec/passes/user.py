"""User passes: your own ``fn(gm, ctx) -> gm``, placed among the built-in passes.

Two ways in, one pass protocol (the invariants of ``README.md``, counters under the pass's name, events in
the report, ``fxspec pipeline`` shows it at its place)::

    @fxspec.register_pass(after="fuse_projections", options=MyOptions)   # from Python
    def my_pass(gm, ctx): ...

    passes = ["mypkg.passes:my_pass", {fn = "mypkg.other:scale_fold", after = "my_pass"}]   # from TOML
    [pass_options.my_pass]                                               # typed options (MyOptions' fields)
    threshold = 0.5

**When a user pass runs.** A pass named in the config's ``passes`` runs in that compile. A pass registered
from Python runs in every compile while it is registered, except a lossy one (``lossy=True``), which runs
only when the config names it in ``passes`` (invariant 4: lossy only when asked). Importing a module whose
functions are decorated with ``@register_pass`` registers them for the process; ``unregister_pass(name)``
and ``scoped_registry()`` undo that.

**Placement.** One of ``after = "<pass>"``, ``before = "<pass>"`` or ``position = "first" | "last"``; default
``before = "quantize_weights"`` (after the structural passes, so quantization also sees what a user pass
creates). The anchor is a built-in pass or a user pass placed earlier (registered before, or listed earlier
in ``passes``). Several user passes at one anchor keep their order: registered ones in registration order,
then the config's in list order.

**Options.** ``options=`` takes a dataclass whose fields all have defaults; the values come from the config's
``[pass_options.<name>]`` table, checked like the built-in sections (unknown keys and wrong types are a
``ConfigError``; ``__post_init__`` may raise ``ValueError`` for range checks). Field types: ``bool``, ``int``,
``float``, ``str``, ``list[str | int | float]`` and ``X | None``. The pass reads them as ``ctx.options``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx

from .._imports import MissingAttribute, import_object
from ..config import ConfigError, FxspecConfig, _check_keys, _check_type
from .base import Pass, PassFn

_POSITIONS = ("first", "last")
_DEFAULT_PLACE = ("before", "quantize_weights")
_OPTION_TYPES = (bool, int, float, str)


class UserPassError(RuntimeError):
    """A user pass raised, returned something other than a GraphModule, or changed what the graph returns.
    The backend falls back to plain Inductor with this message (``strict = true`` raises it)."""


@dataclass(frozen=True)
class UserPass(Pass):
    """A pass that is not one of fxspec's own: ``section`` is ``pass_options.<name>``."""

    place: tuple[str, str] = _DEFAULT_PLACE  # ("after" | "before" | "position", anchor or "first"/"last")
    options_cls: type | None = None
    origin: str = "registered from Python"  # or "passes[i] = 'module:function'"
    listed: bool = False  # named in the config's passes

    def enabled(self, config: FxspecConfig) -> bool:
        return self.listed or not self.lossy

    @property
    def options_key(self) -> str:
        return self.section.split(".", 1)[1]

    def options(self, config: FxspecConfig) -> Any:
        return build_options(self.options_key, self.options_cls, config.pass_options.get(self.options_key, {}))


@dataclass
class _Entry:
    """A table item of ``passes``."""

    fn: str
    after: str | None = None
    before: str | None = None
    position: str | None = None


#: Passes registered from Python, in registration order.
_REGISTRY: dict[str, UserPass] = {}


# ---------------------------------------------------------------------------------------------
# Registration from Python
# ---------------------------------------------------------------------------------------------

def register_pass(name: str | Callable | None = None, *, after: str | None = None, before: str | None = None,
                  position: str | None = None, lossy: bool = False, section: str | None = None,
                  options: type | None = None) -> Any:
    """Register ``fn(gm, ctx) -> gm`` as a pass; use as ``@register_pass`` or ``@register_pass(...)``.

    ``name`` defaults to the function's name (it names the counters, events and ``[pass_options.<name>]``).
    ``after`` / ``before`` a pass name or ``position`` ``"first"`` / ``"last"`` place it (default: before
    ``quantize_weights``). ``lossy=True``: runs only when the config names it in ``passes``. ``options``: a
    dataclass of typed options read from ``[pass_options.<section or name>]``; ``section`` renames that table.
    Registering a name again with a function of the same module and qualified name replaces it (re-running a
    notebook cell); another function under a taken name is a ``ConfigError``. Returns the function.
    """
    if callable(name):  # bare @register_pass
        return register_pass()(name)

    def decorate(fn: Callable) -> Callable:
        pname = name or getattr(fn, "__name__", "")
        where = f"register_pass({pname!r})"
        _check_fn(fn, where)
        p = _make(fn, pname, where, after, before, position, lossy, options, "registered from Python", section)
        old = _REGISTRY.get(p.name)
        if old is not None and _ident(old.fn) != _ident(fn):
            raise ConfigError(f"{where}: the name is taken by {_ident(old.fn)}; pass name=... to register "
                              f"{_ident(fn)} under another name")
        registered = {k: v for k, v in _REGISTRY.items() if k != p.name}
        _place([*_builtins(), *registered.values(), p], where)  # the anchor must exist now
        _REGISTRY.pop(p.name, None)
        _REGISTRY[p.name] = p
        fn.__fxspec_pass__ = p  # type: ignore[attr-defined]
        return fn

    return decorate


def unregister_pass(name: str | Callable) -> None:
    """Remove a registered pass (by name or function); a name that is not registered is a ``KeyError``."""
    key = getattr(name, "__fxspec_pass__", None)
    key = key.name if key is not None else name
    if key not in _REGISTRY:
        raise KeyError(f"no registered pass {key!r}; registered: {', '.join(_REGISTRY) or 'none'}")
    del _REGISTRY[key]


@contextlib.contextmanager
def scoped_registry() -> Iterator[None]:
    """Passes registered inside the block (also by modules imported there) are unregistered at its end."""
    saved = dict(_REGISTRY)
    try:
        yield
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)


def registered_passes() -> list[UserPass]:
    return list(_REGISTRY.values())


# ---------------------------------------------------------------------------------------------
# The effective pipeline
# ---------------------------------------------------------------------------------------------

def effective_pipeline(config: FxspecConfig | None = None) -> list[Pass]:
    """The built-in ``PIPELINE`` with the registered passes and the config's ``passes`` at their places:
    the one list that ``run_pipeline``, the report and ``fxspec pipeline`` use. Raises ``ConfigError``."""
    config = config if config is not None else FxspecConfig()
    listed = _config_passes(config)
    user = [listed.get(p.name, p) for p in _REGISTRY.values()]
    user += [p for p in listed.values() if p.name not in _REGISTRY]
    for key, given in config.pass_options.items():
        p = next((q for q in user if q.options_key == key), None)
        if p is None:
            raise ConfigError(f"pass_options.{key}: no user pass has the options section {key!r}; user passes: "
                              f"{', '.join(q.name for q in user) or 'none'}")
        build_options(key, p.options_cls, given)
    out = _place(_builtins() + user, "passes") if user else _builtins()
    return out


def check_config(config: FxspecConfig) -> None:
    """Everything about the user passes that ``load_config`` checks (called from ``FxspecConfig.validate``
    when ``passes`` or ``pass_options`` is given): imports, signatures, placements, options."""
    effective_pipeline(config)


def _builtins() -> list[Pass]:
    from .pipeline import PIPELINE

    return list(PIPELINE)


def _config_passes(config: FxspecConfig) -> dict[str, UserPass]:
    entries = config.passes
    if isinstance(entries, (str, dict)):
        entries = [entries]
    if not isinstance(entries, (list, tuple)):
        raise ConfigError(f"passes = {entries!r} must be a list of \"module:function\" strings or tables "
                          f"{{fn = \"module:function\", after = \"<pass>\"}}")
    out: dict[str, UserPass] = {}
    for i, item in enumerate(entries):
        where = f"passes[{i}] = {item!r}"
        if isinstance(item, str):
            entry = _Entry(item)
        elif isinstance(item, dict):
            if "fn" not in item:
                raise ConfigError(f"{where}: the table needs fn = \"module:function\"")
            entry = _Entry(**_check_keys(item, _Entry, f"passes[{i}]"))
            if not isinstance(entry.fn, str):
                raise ConfigError(f"{where}: fn must be a string \"module:function\"")
            for key in ("after", "before", "position"):
                _check_type(f"passes[{i}].{key}", getattr(entry, key), str | None)
        else:
            raise ConfigError(f"{where}: an entry is a string \"module:function\" or a table "
                              f"{{fn = \"module:function\", after = \"<pass>\"}}")
        p = _resolve(entry, where)
        if p.name in out:
            raise ConfigError(f"{where}: pass {p.name!r} is listed twice")
        out[p.name] = p
    return out


def _resolve(entry: _Entry, where: str) -> UserPass:
    """An entry of ``passes`` -> its pass: a registered name, or ``module:function`` (imported; a function
    decorated with ``@register_pass`` keeps its name, options and placement unless the entry places it)."""
    placed = any(v is not None for v in (entry.after, entry.before, entry.position))
    if ":" not in entry.fn:
        if entry.fn not in _REGISTRY:
            raise ConfigError(f"{where}: expected \"module:function\" (or the name of a pass registered with "
                              f"@fxspec.register_pass; registered: {', '.join(_REGISTRY) or 'none'})")
        base = _REGISTRY[entry.fn]
    else:
        mod_name, _, attr = entry.fn.partition(":")
        try:
            module, obj = import_object(entry.fn)
        except MissingAttribute:
            module = importlib.import_module(mod_name)  # (imported above: cached)
            public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise ConfigError(f"{where}: module {mod_name!r} has no attribute {attr!r}; its functions: "
                              f"{', '.join(public) or 'none'}") from None
        except Exception as e:
            raise ConfigError(f"{where}: cannot import module {mod_name!r}: {type(e).__name__}: {e}") from None
        _check_fn(obj, where)
        base = getattr(obj, "__fxspec_pass__", None)
        if base is None or base.fn is not obj:
            base = _make(obj, getattr(obj, "__name__", attr), where, None, None, None, False, None, where, None)
    place = _placement(entry.after, entry.before, entry.position, where) if placed else base.place
    return dataclasses.replace(base, place=place, origin=where, listed=True)


def _make(fn: Callable, name: str, where: str, after: str | None, before: str | None, position: str | None,
          lossy: bool, options: type | None, origin: str, section: str | None) -> UserPass:
    for what, value in (("name", name), ("section", section or name)):
        if not isinstance(value, str) or not value.isidentifier():
            raise ConfigError(f"{where}: a pass {what} must be an identifier (it names counters and "
                              f"[pass_options.<section>]); got {value!r}")
    _check_options_cls(options, where)
    doc = (fn.__doc__ or name).strip().splitlines()[0]
    return UserPass(name, f"pass_options.{section or name}", fn, bool(lossy), doc,
                    place=_placement(after, before, position, where), options_cls=options, origin=origin)


def _placement(after: str | None, before: str | None, position: str | None, where: str) -> tuple[str, str]:
    given = [(k, v) for k, v in (("after", after), ("before", before), ("position", position)) if v is not None]
    if len(given) > 1:
        raise ConfigError(f"{where}: give one of after, before, position (got {', '.join(k for k, _ in given)})")
    if not given:
        return _DEFAULT_PLACE
    key, value = given[0]
    if not isinstance(value, str) or (key == "position" and value not in _POSITIONS):
        allowed = " or ".join(repr(p) for p in _POSITIONS) if key == "position" else "a pass name"
        raise ConfigError(f"{where}: {key} = {value!r} is not allowed; use {allowed}")
    return key, value


def _place(passes: list[Pass], where: str) -> list[Pass]:
    """Insert the user passes (in order) among the built-in ones by their ``place``."""
    out = [p for p in passes if not isinstance(p, UserPass)]
    for p in passes:
        if not isinstance(p, UserPass):
            continue
        key, anchor = p.place
        names = [q.name for q in out]
        if p.name in names:
            raise ConfigError(f"{p.origin}: the pass name {p.name!r} is taken by another pass; register it "
                              f"under another name (register_pass(name=...))")
        if key == "position":
            i = 0 if anchor == "first" else len(out)
            if anchor == "first":
                while i < len(out) and isinstance(out[i], UserPass):
                    i += 1
        elif anchor not in names:
            later = [q.origin for q in passes if isinstance(q, UserPass) and q.name == anchor]
            why = (f"it is placed later ({later[0]}); list {anchor!r} first" if later else
                   f"known passes: {', '.join(names)}")
            raise ConfigError(f"{p.origin if p.origin.startswith('passes[') else where}: {key} = {anchor!r} "
                              f"names no pass placed before this one; {why}")
        elif key == "before":
            i = names.index(anchor)
        else:
            i = names.index(anchor) + 1
            while i < len(out) and isinstance(out[i], UserPass):
                i += 1
        out.insert(i, p)
    return out


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------

def _check_fn(fn: Any, where: str) -> None:
    if not callable(fn):
        raise ConfigError(f"{where}: {fn!r} is not callable; a pass is a function fn(gm, ctx) -> gm")
    try:
        inspect.signature(fn).bind(object(), object())
    except TypeError:
        raise ConfigError(f"{where}: {_ident(fn)}{inspect.signature(fn)} has the wrong signature; a pass "
                          f"takes two positional arguments: fn(gm, ctx) -> gm") from None
    except ValueError:
        raise ConfigError(f"{where}: cannot read the signature of {fn!r}; a pass is a Python function "
                          f"fn(gm, ctx) -> gm") from None


def _check_options_cls(cls: Any, where: str) -> None:
    if cls is None:
        return
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ConfigError(f"{where}: options = {cls!r} must be a dataclass type")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: option {f.name!r} of {cls.__name__} needs a default")
        if not _supported(hints[f.name]):
            raise ConfigError(f"{where}: option {f.name!r} of {cls.__name__} has type {hints[f.name]!r}; "
                              f"options are bool, int, float, str, list[...] of those, or X | None")


def _supported(hint: Any) -> bool:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return len(args) == 1 and _supported(args[0])
    if typing.get_origin(hint) is list:
        return len(args) == 1 and args[0] in _OPTION_TYPES
    return hint in _OPTION_TYPES


def build_options(name: str, cls: type | None, given: Any) -> Any:
    """``[pass_options.<name>]`` -> an instance of the pass's options dataclass (None when it has none)."""
    prefix = f"pass_options.{name}"
    if not isinstance(given, dict):
        raise ConfigError(f"{prefix} = {given!r} must be a table of options")
    if cls is None:
        if given:
            raise ConfigError(f"[{prefix}] is given but pass {name!r} declares no options "
                              f"(register it with @fxspec.register_pass(options=SomeDataclass))")
        return None
    values = _check_keys(given, cls, prefix)
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        values[key] = _check_type(f"{prefix}.{key}", value, hints[key])
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[{prefix}]: {e}") from None


def output_signature(gm: fx.GraphModule) -> list[Any]:
    """What the graph returns, per output: ``(shape, dtype)`` of a tensor (from ``node.meta``; None where the
    meta is missing), else the value's type name."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    sig = []
    for a in _flat(out.args[0]):
        if isinstance(a, fx.Node):
            v = a.meta.get("val", a.meta.get("example_value"))
            sig.append((tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else None)
        else:
            sig.append(type(a).__name__)
    return sig


def _flat(x: Any) -> list[Any]:
    if isinstance(x, (list, tuple)):
        return [y for a in x for y in _flat(a)]
    if isinstance(x, dict):
        return [y for a in x.values() for y in _flat(a)]
    return [x]


def run_user_pass(p: UserPass, gm: fx.GraphModule, ctx: Any) -> fx.GraphModule:
    """Run a user pass; any failure becomes a :class:`UserPassError` naming it. Checks invariant 3 (what the
    graph returns: count, and shapes and dtypes where ``node.meta`` has them before and after)."""
    before = output_signature(gm)
    try:
        new = p.fn(gm, ctx)
    except ConfigError:
        raise
    except Exception as e:
        raise UserPassError(f"user pass {p.name!r} ({p.origin}) raised {type(e).__name__}: {e}") from e
    if not isinstance(new, fx.GraphModule):
        raise UserPassError(f"user pass {p.name!r} ({p.origin}) returned {type(new).__name__}, not the "
                            f"GraphModule; a pass ends with `return gm`")
    try:
        new.graph.lint()
    except Exception as e:
        raise UserPassError(f"user pass {p.name!r} left an invalid graph: {e}") from e
    after = output_signature(new)
    if len(after) != len(before):
        raise UserPassError(f"user pass {p.name!r} changed what the graph returns: {len(before)} output(s) "
                            f"before, {len(after)} after")
    for i, (b, a) in enumerate(zip(before, after)):
        if b is not None and a is not None and b != a:
            raise UserPassError(f"user pass {p.name!r} changed what the graph returns: output {i} was "
                                f"{_sig_text(b)}, now {_sig_text(a)}")
    return new


def _sig_text(s: Any) -> str:
    if isinstance(s, tuple):
        return f"{str(s[1]).replace('torch.', '')}{list(s[0])}"
    return str(s)


def _ident(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


__all__ = ["PassFn", "UserPass", "UserPassError", "build_options", "check_config", "effective_pipeline",
           "register_pass", "registered_passes", "scoped_registry", "unregister_pass"]
