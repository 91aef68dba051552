"""Per-dtype tolerances, as data (compiled vs eager; Inductor may reorder reductions)."""

import torch

TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def assert_close(actual, expected, msg=None, dtype=None):
    """``torch.testing.assert_close`` with the tolerance of the tensors' dtype."""
    if hasattr(actual, "logits"):
        actual, expected = actual.logits, expected.logits
    if isinstance(actual, (tuple, list)):
        for a, e in zip(actual, expected):
            assert_close(a, e, msg, dtype)
        return
    tol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, **tol, msg=msg)
