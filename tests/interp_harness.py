"""Run Triton kernels under ``TRITON_INTERPRET=1`` in one subprocess per test module.

The variable must be set before triton is imported, and in a shared pytest process another module
may already have imported triton, so a kernel test module runs itself as a subprocess
(``python -m tests.<module> --interp``):

* subprocess side: :func:`emit_cases` runs every ``(id, case)`` and prints one ``CASE {json}`` line
  per case (an exception becomes that case's ``error``), :func:`emit_extra` one ``EXTRA {json}``;
* pytest side: :func:`run_module` (called from a module-scoped fixture) collects those lines, and
  each case is then its own parametrized test that looks its result up by id.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def emit_cases(cases, run_case) -> None:
    """Subprocess side: ``run_case(case) -> dict`` for every ``(id, case)``; one CASE line each."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1 (see run_module)"
    for cid, c in cases:
        t = time.time()
        try:
            res = run_case(c)
        except Exception as e:  # reported per case
            res = dict(error=f"{type(e).__name__}: {e}"[:2000])
        res["seconds"] = round(time.time() - t, 3)
        print("CASE " + json.dumps(dict(id=cid, **res)), flush=True)


def emit_extra(extra: dict) -> None:
    print("EXTRA " + json.dumps(extra), flush=True)


def emit_value_errors(calls) -> None:
    """Run each ``(name, fn)`` (a launcher call that must raise ValueError) and emit, per name, ``"ok: <the
    message>"``, ``"no error"`` or ``"wrong error ..."``; :func:`assert_value_errors` checks them."""
    checks = {}
    for name, fn in calls:
        try:
            fn()
            checks[name] = "no error"
        except ValueError as e:
            checks[name] = "ok: " + str(e)[:200]
        except Exception as e:
            checks[name] = f"wrong error {type(e).__name__}: {e}"[:300]
    emit_extra(checks)


def assert_value_errors(results: dict) -> None:
    """Every call of :func:`emit_value_errors` in the subprocess raised a ValueError."""
    errs = results["extra"]
    assert errs is not None, results["stderr"][-3000:]
    for name, v in errs.items():
        assert v.startswith("ok: "), (name, v)


def case_result(results: dict, cid: str) -> dict:
    """The subprocess's result of case ``cid``: present, and without an error (else the assertion shows the
    subprocess's stderr or the error)."""
    res = results["cases"].get(cid)
    assert res is not None, f"case missing from subprocess output:\n{results['stderr'][-3000:]}"
    assert "error" not in res, res["error"]
    return res


def run_module(test_file: str, timeout: int = 600) -> dict:
    """Pytest side: run ``tests/<test_file>`` as ``python -m tests.<name> --interp`` under the
    interpreter; returns ``{cases: {id: result}, extra, rc, stderr}``.  Fails the calling test when
    the subprocess produced no case at all (its stderr is shown)."""
    import pytest
    pytest.importorskip("triton")
    module = "tests." + os.path.splitext(os.path.basename(test_file))[0]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.time()
    r = subprocess.run([sys.executable, "-m", module, "--interp"], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=timeout)
    cases, extra = {}, None
    for line in r.stdout.splitlines():
        if line.startswith("CASE "):
            d = json.loads(line[5:])
            cases[d["id"]] = d
        elif line.startswith("EXTRA "):
            extra = json.loads(line[6:])
    if not cases:
        pytest.fail(f"interpreter subprocess produced no results (rc={r.returncode}):\n{r.stderr[-4000:]}")
    print(f"\n[{module} interpreter subprocess: {len(cases)} cases in {time.time() - t:.1f}s]")
    return dict(cases=cases, extra=extra, rc=r.returncode, stderr=r.stderr)
