"""Kernels: fused Triton kernels for the GPU and their plain-PyTorch references (used on the CPU and by
the tests).

One sub-package per kernel family, each laid out the same way -- ``ops.py`` (the ``torch.ops.fxspec`` ops,
their fake implementations and the choice between the Triton path and the reference), ``reference.py``
(plain-PyTorch references and argument checks), ``launch.py`` (shape checks, config choice, launch) and
the ``@triton.jit`` kernels in files named by path:

* ``dense``: unquantized decode GEMVs (``linear_group``, ``fused_linear``);
* ``quant``: weight-only quantized linears (int8 / int4 / fp8; ``pack.py`` holds the packed formats);
* ``attention``: one-token decode attention over a KV cache;
* ``sparse``: decode GEMVs that skip the weight rows of zero activations (input- and output-sparse).
* ``block_sparse``: learned block-sparse attention (kept key blocks only; the gates' block stats; decode).

Families share only :mod:`._triton` (interpreter switch, device facts, split-K workspace, programmatic
dependent launch, the shared ``@triton.jit`` helpers, autotune and the per-GPU tables in
``tuned_tables/``) and :mod:`.edges` (the fused edges' checks and RMSNorm reference); they never import
each other.  Launch-time switches: :mod:`.settings`.
"""
