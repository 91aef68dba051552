"""Per-dtype tolerances, as data (compiled vs eager; Inductor may reorder reductions): the one table lives in
``fxspec.testing`` (public, for pass authors), with the ``assert_close`` that reads it."""

from fxspec.testing import TOL, assert_close

__all__ = ["TOL", "assert_close"]
