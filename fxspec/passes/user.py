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

**Placement.** One of ``after = "<pass>"``, ``before = "<pass>"`` or ``position = "first" | "last" | N``;
default ``before = "quantize_weights"`` (after the structural passes, so quantization also sees what a user pass
creates). The anchor is a built-in pass or a user pass placed earlier (registered before, or listed earlier
in ``passes``). Several user passes at one anchor keep their order: registered ones in registration order,
then the config's in list order. An integer ``position`` is an index into the effective pipeline (the list
``fxspec pipeline`` prints, whose numbers start at 1: index 0 is line ``1.``), negative from the end as in
Python (``-1``: last). Passes placed by an index are placed after all the others, and the index counts in the
list of all the others; several at one index keep the order above.

**Options.** ``options=`` takes a dataclass whose fields all have defaults; the values come from the config's
``[pass_options.<name>]`` table, checked like the built-in sections (unknown keys and wrong types are a
``ConfigError``; ``__post_init__`` may raise ``ValueError`` for range checks). Field types: ``bool``, ``int``,
``float``, ``str``, ``list[str | int | float]`` and ``X | None``. The pass reads them as ``ctx.options``. A pass
named in a config table may name its dataclass there (``{fn = "m:f", options = "m:Opts"}``). A user pass without
an options dataclass gets the table as given, as a read-only mapping (``ctx.options["key"]``; empty without a
table). A ``[pass_options.<name>]`` table that no user pass reads is a ``ConfigError``.

**Outputs.** After a user pass, :func:`run_user_pass` checks invariant 3: the graph returns as many outputs, with
the same shapes and dtypes wherever ``node.meta`` has them, and no output aliases an input (is a placeholder or a
view of one) that it did not alias before. A violation is a :class:`UserPassError` naming the pass and the
output.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import difflib
import importlib
import inspect
import io
import operator
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx

from .._imports import MissingAttribute, import_object
from ..config import ConfigError, FxspecConfig, _check_keys, _check_type, _type_name
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

    place: tuple[str, str | int] = _DEFAULT_PLACE  # ("after" | "before" | "position", a pass name, "first",
    # "last" or an index)
    options_cls: type | None = None
    origin: str = "registered from Python"  # or "passes[i] = 'module:function'"
    listed: bool = False  # named in the config's passes

    def enabled(self, config: FxspecConfig) -> bool:
        return self.listed or not self.lossy

    @property
    def options_key(self) -> str:
        return self.section.split(".", 1)[1]

    def options(self, config: FxspecConfig) -> Any:
        """``ctx.options``: an instance of ``options_cls``, or the table as a read-only mapping without one."""
        return build_options(self.options_key, self.options_cls, config.pass_options.get(self.options_key, {}))


@dataclass
class _Entry:
    """A table item of ``passes``."""

    fn: str
    after: str | None = None
    before: str | None = None
    position: str | int | None = None
    options: str | None = None  # "module:Dataclass": the pass's options dataclass


#: Passes registered from Python, in registration order.
_REGISTRY: dict[str, UserPass] = {}


# ---------------------------------------------------------------------------------------------
# Registration from Python
# ---------------------------------------------------------------------------------------------

def register_pass(name: str | Callable | None = None, *, after: str | None = None, before: str | None = None,
                  position: str | int | None = None, lossy: bool = False, section: str | None = None,
                  options: type | None = None) -> Any:
    """Register ``fn(gm, ctx) -> gm`` as a pass; use as ``@register_pass`` or ``@register_pass(...)``.

    ``name`` defaults to the function's name (it names the counters, events and ``[pass_options.<name>]``).
    ``after`` / ``before`` a pass name or ``position`` ``"first"`` / ``"last"`` / an index into the effective
    pipeline (negative: from the end) place it (default: before ``quantize_weights``). ``lossy=True``: runs only
    when the config names it in ``passes``. ``options``: a dataclass of typed options read from
    ``[pass_options.<section or name>]`` (``section`` renames that table); without one, ``ctx.options`` is that
    table as a read-only mapping.
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
            raise ConfigError(_unknown_options_text(key, user))
        build_options(key, p.options_cls, given)
    out = _place(_builtins() + user, "passes") if user else _builtins()
    return out


def _unknown_options_text(key: str, user: list[UserPass]) -> str:
    known = [q.name if q.options_key == q.name else f"{q.name} ([pass_options.{q.options_key}])" for q in user]
    near = difflib.get_close_matches(str(key), [q.options_key for q in user], n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return (f"pass_options.{key}: no user pass has the options section {key!r}{hint}; user passes: "
            f"{', '.join(known) or 'none'} (a pass from a module is known once the config's passes names it)")


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
            for key in ("after", "before", "options"):
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
    options = _options_cls(entry.options, where) if entry.options is not None else None
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
            public = sorted(n for n, v in vars(module).items() if callable(v) and not isinstance(v, type)
                            and not n.startswith("_") and getattr(v, "__module__", mod_name) == mod_name)
            raise ConfigError(f"{where}: module {mod_name!r} has no attribute {attr!r}; its functions: "
                              f"{', '.join(public) or 'none'}") from None
        except Exception as e:
            raise ConfigError(f"{where}: cannot import module {mod_name!r}: {type(e).__name__}: {e}") from None
        _check_fn(obj, where)
        base = getattr(obj, "__fxspec_pass__", None)
        if base is None or base.fn is not obj:
            base = _make(obj, getattr(obj, "__name__", attr), where, None, None, None, False, None, where, None)
    place = _placement(entry.after, entry.before, entry.position, where) if placed else base.place
    if options is not None:
        base = dataclasses.replace(base, options_cls=options)
    return dataclasses.replace(base, place=place, origin=where, listed=True)


def _options_cls(spec: str, where: str) -> type:
    """A table's ``options = "module:Dataclass"`` -> the dataclass (checked like ``register_pass(options=)``)."""
    if ":" not in spec:
        raise ConfigError(f"{where}: options = {spec!r} must name a dataclass as \"module:Dataclass\"")
    mod_name, _, attr = spec.partition(":")
    try:
        _, cls = import_object(spec)
    except MissingAttribute:
        module = importlib.import_module(mod_name)
        classes = sorted(n for n, v in vars(module).items() if dataclasses.is_dataclass(v) and isinstance(v, type))
        raise ConfigError(f"{where}: options = {spec!r}: module {mod_name!r} has no attribute {attr!r}; its "
                          f"dataclasses: {', '.join(classes) or 'none'}") from None
    except Exception as e:
        raise ConfigError(f"{where}: options = {spec!r}: cannot import module {mod_name!r}: "
                          f"{type(e).__name__}: {e}") from None
    _check_options_cls(cls, f"{where}: options = {spec!r}")
    return cls


def _make(fn: Callable, name: str, where: str, after: str | None, before: str | None, position: str | int | None,
          lossy: bool, options: type | None, origin: str, section: str | None) -> UserPass:
    for what, value in (("name", name), ("section", section or name)):
        if not isinstance(value, str) or not value.isidentifier():
            raise ConfigError(f"{where}: a pass {what} must be an identifier (it names counters and "
                              f"[pass_options.<section>]); got {value!r}")
    _check_options_cls(options, where)
    doc = (fn.__doc__ or name).strip().splitlines()[0]
    return UserPass(name, f"pass_options.{section or name}", fn, bool(lossy), doc,
                    place=_placement(after, before, position, where), options_cls=options, origin=origin)


def _placement(after: str | None, before: str | None, position: str | int | None, where: str
               ) -> tuple[str, str | int]:
    given = [(k, v) for k, v in (("after", after), ("before", before), ("position", position)) if v is not None]
    if len(given) > 1:
        raise ConfigError(f"{where}: give one of after, before, position (got {', '.join(k for k, _ in given)})")
    if not given:
        return _DEFAULT_PLACE
    key, value = given[0]
    if key == "position":
        if _is_index(value) or value in _POSITIONS:
            return key, value
        raise ConfigError(f"{where}: position = {value!r} is not allowed; use 'first', 'last' or an integer index "
                          f"into the pipeline as `fxspec pipeline` prints it (0: first, -1: last)")
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key} = {value!r} is not allowed; use a pass name")
    return key, value


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _who(p: UserPass, where: str) -> str:
    """Where a placement error points: the config entry, or the registration."""
    if p.listed:
        return p.origin
    return f"register_pass({p.name!r})" if where == "passes" else where


def _place(passes: list[Pass], where: str) -> list[Pass]:
    """Insert the user passes (in order) among the built-in ones by their ``place``: first those placed by a
    name or "first" / "last", then those placed by an index, which counts in the list of all the others."""
    out = [p for p in passes if not isinstance(p, UserPass)]
    user = [p for p in passes if isinstance(p, UserPass)]
    indexed = [p for p in user if p.place[0] == "position" and _is_index(p.place[1])]
    for p in user:
        key, anchor = p.place
        names = [q.name for q in out] + [q.name for q in indexed if q is not p]
        if p.name in names:
            raise ConfigError(f"{p.origin}: the pass name {p.name!r} is taken by another pass; register it "
                              f"under another name (register_pass(name=...))")
        if p in indexed:
            continue
        names = [q.name for q in out]
        if key == "position":
            i = 0 if anchor == "first" else len(out)
            if anchor == "first":
                while i < len(out) and isinstance(out[i], UserPass):
                    i += 1
        elif anchor not in names:
            later = [q.origin for q in passes if isinstance(q, UserPass) and q.name == anchor]
            by_index = [q for q in indexed if q.name == anchor]
            if by_index:
                why = (f"{anchor!r} is placed by position = {by_index[0].place[1]}, after every pass placed by a "
                       f"name; give this pass a position too, or place {anchor!r} by after/before")
            elif later:
                why = f"it is placed later ({later[0]}); list {anchor!r} first"
            else:
                why = f"known passes: {', '.join(names)}"
            raise ConfigError(f"{_who(p, where)}: {key} = {anchor!r} names no pass placed before this one; {why}")
        elif key == "before":
            i = names.index(anchor)
        else:
            i = names.index(anchor) + 1
            while i < len(out) and isinstance(out[i], UserPass):
                i += 1
        out.insert(i, p)
    if not indexed:
        return out
    n = len(out)
    slots = []
    for p in indexed:
        index = int(p.place[1])
        if not -(n + 1) <= index <= n:
            raise ConfigError(f"{_who(p, where)}: position = {index} is out of range; the pipeline has {n} other "
                              f"passes, so an index is from {-(n + 1)} to {n} (0: first, -1: last): "
                              f"{', '.join(f'{i}: {q.name}' for i, q in enumerate(out))}")
        slots.append(index if index >= 0 else n + 1 + index)
    placed: list[Pass] = []
    for s in range(n + 1):
        placed += [p for p, slot in zip(indexed, slots) if slot == s]
        placed += out[s:s + 1]
    return placed


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
    """``[pass_options.<name>]`` -> an instance of the pass's options dataclass; without a dataclass, the table
    as given (a copy), as a read-only mapping (empty when the config has no such table)."""
    prefix = f"pass_options.{name}"
    if not isinstance(given, dict):
        raise ConfigError(f"{prefix} = {given!r} must be a table of options")
    if cls is None:
        for key in given:
            if not isinstance(key, str):
                raise ConfigError(f"{prefix}: option names are strings, got {key!r}")
        return types.MappingProxyType(copy.deepcopy(given))
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


def output_aliases(gm: fx.GraphModule) -> list[frozenset[str]]:
    """Per output (in the order of :func:`output_signature`), the inputs it may alias: the placeholders it is,
    or that it is a view of (through view-like methods and functions, ``getitem`` and aten ops whose schema
    says the result aliases an argument)."""
    out = _output(gm)
    return [_alias_roots(a) if isinstance(a, fx.Node) else frozenset() for a in _flat(out.args[0])]


#: Methods / functions whose result may share the storage of their first argument.
_VIEWS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "expand", "expand_as", "squeeze",
    "unsqueeze", "flatten", "unflatten", "contiguous", "t", "T", "mT", "narrow", "select", "detach", "unfold",
    "as_strided", "movedim", "moveaxis", "swapaxes", "swapdims", "diagonal", "split", "chunk", "unbind",
    "tensor_split", "hsplit", "vsplit", "__getitem__", "getitem", "real", "imag", "view_as_real",
    "view_as_complex", "alias", "_unsafe_view", "align_as", "rename", "refine_names", "requires_grad_",
    "to", "type", "type_as", "float", "double", "half", "bfloat16", "int", "long", "bool", "cpu", "cuda",
})


def _alias_roots(node: fx.Node, depth: int = 0) -> frozenset[str]:
    if node.op == "placeholder":
        return frozenset({node.name})
    if depth > 64 or node.op not in ("call_method", "call_function") or not node.args:
        return frozenset()
    src = node.args[0]
    if not isinstance(src, fx.Node):
        return frozenset()
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        views = any(r.alias_info is not None for r in t._schema.returns)
    elif t is operator.getitem:
        views = True
    else:
        views = (t if isinstance(t, str) else getattr(t, "__name__", "")) in _VIEWS
    if not views:
        return frozenset()
    v, w = (n.meta.get("val", n.meta.get("example_value")) for n in (node, src))
    if isinstance(v, torch.Tensor) and isinstance(w, torch.Tensor) and (v.dtype, v.device) != (w.dtype, w.device):
        return frozenset()  # a conversion that copies (.float() of a half tensor, .to("cuda"), ...)
    return _alias_roots(src, depth + 1)


def run_user_pass(p: UserPass, gm: fx.GraphModule, ctx: Any) -> fx.GraphModule:
    """Run a user pass; any failure becomes a :class:`UserPassError` naming it. Checks invariant 3: what the graph
    returns (count, and shapes and dtypes where ``node.meta`` has them before and after), and that no output
    aliases an input that it did not alias before."""
    before = output_signature(gm)
    aliased_before = output_aliases(gm)
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
        raise UserPassError(f"user pass {p.name!r} ({p.origin}) changed what the graph returns: {len(before)} "
                            f"output(s) before, {len(after)} after")
    nodes = [a.name if isinstance(a, fx.Node) else repr(a) for a in _flat(_output(new).args[0])]
    for i, (b, a) in enumerate(zip(before, after)):
        if b is not None and a is not None and b != a:
            raise UserPassError(f"user pass {p.name!r} changed what the graph returns: output {i} was "
                                f"{_sig_text(b)}, now {_sig_text(a)} (node {nodes[i]}; {p.origin})")
    for i, (b, a) in enumerate(zip(aliased_before, output_aliases(new))):
        if a - b:
            node = _flat(_output(new).args[0])[i]
            what = "is input" if node.op == "placeholder" else "is a view of input"
            raise UserPassError(f"user pass {p.name!r} ({p.origin}) made output {i} (node {nodes[i]}) alias a graph "
                                f"input: it {what} {', '.join(repr(x) for x in sorted(a - b))}, which it did not "
                                f"alias before; return a new tensor (e.g. .clone())")
    return new


def _output(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def describe_options(config: FxspecConfig | None = None) -> str:
    """The option fields of the user passes (registered, and named in ``config``'s ``passes``), a section per
    pass, in the form of ``fxspec.config.describe_schema`` (``fxspec config --schema``); empty without any."""
    user = [p for p in effective_pipeline(config) if isinstance(p, UserPass)]
    out = []
    for p in user:
        prefix = f"pass_options.{p.options_key}"
        if p.options_cls is None:
            out.append(f"\n[{prefix}]  user pass {p.name} ({p.origin}): no options dataclass; ctx.options is the "
                       f"table as given, a read-only mapping")
            continue
        cls = p.options_cls
        out.append(f"\n[{prefix}]  user pass {p.name} ({p.origin}): options {cls.__module__}.{cls.__qualname__}")
        hints, docs = typing.get_type_hints(cls), _field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            out.append(f"{prefix}.{f.name}: {_type_name(hints[f.name])} = {default!r}\n    {docs.get(f.name, '')}")
    return "\n".join(out)


def _field_docs(cls: type) -> dict[str, str]:
    """Each field's doc: ``field(metadata={"doc": ...})``, else a string right after the field in the class body,
    else the comment at the end of the field's line."""
    docs: dict[str, str] = {}
    try:
        src = textwrap.dedent(inspect.getsource(cls))
        body = ast.parse(src).body[0].body  # type: ignore[attr-defined]
        comments = {tok.start[0]: tok.string.lstrip("#").strip()
                    for tok in tokenize.generate_tokens(io.StringIO(src).readline) if tok.type == tokenize.COMMENT}
    except (OSError, TypeError, SyntaxError, IndexError, AttributeError, tokenize.TokenError):
        body, comments = [], {}
    for stmt, nxt in zip(body, [*body[1:], None]):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        if (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
        elif stmt.end_lineno in comments:
            docs[stmt.target.id] = comments[stmt.end_lineno]
    for f in dataclasses.fields(cls):
        if f.metadata.get("doc"):
            docs[f.name] = str(f.metadata["doc"])
    return docs


def _sig_text(s: Any) -> str:
    if isinstance(s, tuple):
        return f"{str(s[1]).replace('torch.', '')}{list(s[0])}"
    return str(s)


def _ident(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


__all__ = ["PassFn", "UserPass", "UserPassError", "build_options", "check_config", "describe_options",
           "effective_pipeline", "output_aliases", "output_signature", "register_pass", "registered_passes",
           "scoped_registry", "unregister_pass"]
