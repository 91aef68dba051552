"""Probe (GPU): does the one-row input-sparse GEMV lose DRAM efficiency by reading the transposed weight
``W^T [K, N]`` in row pieces of ``BN`` columns, against a column-block-tiled layout ``[N / BN, K, BN]`` in which
each program's rows are one contiguous stream?  A read-only kernel of the sparse kernel's shape (a list of
active rows per split, ``BK`` rows per step, fp32 accumulation, no x) on the Llama-8B FFN / attention shapes,
all rows (s = 0) and a random 50% / 80% subset; GB/s of the weight bytes read, CUDA graph over weight copies
that defeat L2.  Not run yet; it decides whether ``fxspec.lowering.sparse.pack`` should store the tiled layout.

    PYTHONPATH=. python benchmarks/probe_sparse_layout.py /tmp/layout_probe.json
"""
import json
import sys

import torch
import triton
import triton.language as tl

@triton.jit
def _read(W, IDX, Y, N, K, cnt_per, TILED: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
          SPLIT_LEN: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    ak = tl.arange(0, BK)
    an = tl.arange(0, BN)
    acc = tl.zeros([BK, BN], tl.float32)
    base = pid_k * SPLIT_LEN
    for j in range(0, cnt_per, BK):
        r = j + ak
        ok = r < cnt_per
        k = tl.load(IDX + base + r, mask=ok, other=0)
        if TILED:
            ptr = W + pid_n.to(tl.int64) * K * BN + k.to(tl.int64)[:, None] * BN + an[None, :]
        else:
            ptr = W + k.to(tl.int64)[:, None] * N + (pid_n * BN + an)[None, :]
        acc += tl.load(ptr, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(Y + (pid_k * tl.num_programs(1) + pid_n) * BN + an, tl.sum(acc, 0))


def run(K, N, s, tiled, BN=256, BK=32, split=5, warps=4):
    """(us per call, GB/s of weight bytes read)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    copies = max(2, int(400e6 // (K * N * 2)))
    weights = [torch.randn(K * N, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    L = K // split
    lists = []
    for p in range(split):
        rows = torch.arange(p * L, (p + 1) * L, device="cuda")
        sel = rows[torch.rand(L, device="cuda", generator=g) >= s].int()
        lists.append(torch.cat([sel, torch.zeros(L - sel.numel(), dtype=torch.int32, device="cuda")]))
    idx = torch.cat(lists)
    cnt = int(L * (1 - s))
    y = torch.empty(split * (N // BN) * BN, device="cuda")
    grid = (split, N // BN)

    def call(w):
        _read[grid](w, idx, y, N, K, cnt, TILED=tiled, BN=BN, BK=BK, SPLIT_LEN=L, num_warps=warps)

    for w in weights:
        call(w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            call(w)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / copies)
    t = sorted(times)[2]
    return t, K * N * 2 * (1 - s) / t / 1e3


def main(out: str) -> None:
    rows = []
    for K, N, BN, split in [(4096, 14336, 256, 5), (14336, 4096, 512, 32), (4096, 4096, 512, 32)]:
        for s in (0.0, 0.5, 0.8):
            for tiled in (False, True):
                t, gbs = run(K, N, s, tiled, BN=BN, split=split)
                rows.append(dict(K=K, N=N, BN=BN, split=split, s=s, tiled=tiled, us=round(t, 2), GBps=round(gbs)))
                print(rows[-1], flush=True)
    with open(out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("probe_sparse_layout: needs a CUDA GPU")
    main(sys.argv[1] if len(sys.argv) > 1 else "layout_probe.json")
