"""Kernels of block-sparse decode steps under ``TRITON_INTERPRET=1`` (one subprocess, :mod:`tests.interp_harness`):

* the pooled-key refresh (:mod:`fxspec.lowering.block_sparse.pooled`) against its PyTorch rule over three
  steps in which a new prompt is written over the cache and the lengths grow: the pooled values agree, and the
  stamps (last keys of full blocks, NaN elsewhere) are the same bits;
* the block-sparse decode kernel with a key mask (left padding, random holes), one and two splits, against the
  fp32 reference; the mask changes the result (it is read).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests import interp_harness  # noqa: E402


def _cases():
    c = [(f"refresh_{dt}", dict(kind="refresh", dt=dt)) for dt in ("float32", "bfloat16")]
    c += [(f"decode_mask_splits{s}_{dt}", dict(kind="decode", splits=s, dt=dt))
          for s in (1, 2) for dt in ("float32", "bfloat16")]
    return c


def _run_case(c):
    from fxspec.lowering.block_sparse import block_sparse_decode_attention_ref
    from fxspec.lowering.block_sparse.launch import block_sparse_decode_attention_triton
    from fxspec.lowering.block_sparse.pooled import (new_pooled_state, refresh_pooled_keys_ref,
                                                     refresh_pooled_keys_triton)

    dt = getattr(torch, c["dt"])
    g = torch.Generator().manual_seed(2)
    if c["kind"] == "refresh":
        B, H, L, D, blk = 2, 2, 100, 24, 16
        k = torch.randn(B, H, L, D, generator=g).to(dt)
        kl = torch.tensor([70, 37], dtype=torch.int32)
        a = new_pooled_state(B, H, L, D, blk, dt, "cpu")
        r = new_pooled_state(B, H, L, D, blk, dt, "cpu")
        err, same_stamp = 0.0, True
        for _step in range(3):
            refresh_pooled_keys_triton(*a, k, kl, blk)
            refresh_pooled_keys_ref(*r, k, kl, blk)
            err = max(err, float((a[0] - r[0]).abs().max()))
            same_stamp &= bool(torch.equal(a[1].isnan(), r[1].isnan()) and
                               torch.equal(a[1].nan_to_num(), r[1].nan_to_num()))
            k[:, :, 25:] = torch.randn(B, H, L - 25, D, generator=g).to(dt)  # a new prompt from position 25
            kl = kl + 5
        return dict(err=err, same_stamp=same_stamp, stamped=int((~a[1].isnan()).any(-1).sum()))
    B, Hq, Hkv, L, D, blk = 2, 4, 2, 80, 16, 16
    q, k, v = (torch.randn(B, h, t, D, generator=g).to(dt) for h, t in ((Hq, 1), (Hkv, L), (Hkv, L)))
    km = torch.rand(B, L, generator=g) > 0.3
    km[1, :20] = False
    idx = torch.tensor([[[0, 2, 4], [1, 3, 4]]] * B, dtype=torch.int32)
    cnt = torch.full((B, Hkv), 3, dtype=torch.int32)
    kl = torch.tensor([80, 70], dtype=torch.int32)
    want = block_sparse_decode_attention_ref(q, k, v, idx, cnt, blk, 0.3, kl, km).float()
    nomask = block_sparse_decode_attention_ref(q, k, v, idx, cnt, blk, 0.3, kl).float()
    out = block_sparse_decode_attention_triton(q, k, v, idx, cnt, blk, 0.3, kl, km, splits=c["splits"]).float()
    return dict(err=float((out - want).abs().max()), mask_matters=float((want - nomask).abs().max()))


@pytest.fixture(scope="module")
def interp_results():
    return interp_harness.run_module(__file__, timeout=300)


@pytest.mark.parametrize("cid,case", _cases(), ids=[c[0] for c in _cases()])
def test_decode_kernels_match_references_interpreter(interp_results, cid, case):
    res = interp_harness.case_result(interp_results, cid)
    if case["kind"] == "refresh":
        assert res["err"] <= 1e-5 and res["same_stamp"] and res["stamped"] > 0, res
    else:
        tol = 1e-4 if case["dt"] == "float32" else 2e-2
        assert res["err"] <= tol and res["mask_matters"] > 10 * tol, res


if __name__ == "__main__":
    if "--interp" in sys.argv:
        interp_harness.emit_cases(_cases(), _run_case)
