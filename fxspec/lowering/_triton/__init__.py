"""The one shared layer under fxspec's kernel families (``dense``, ``quant``, ``attention``).

A family imports what it needs from here and never from another family:

* :mod:`.device` -- Triton's interpreter switch, SM count, GPU name, :func:`~.device.triton_available`
  (imports no Triton itself, so the ops' registration never needs it);
* :mod:`.workspace` -- the zeroed split-K counters ("the last program to arrive reduces");
* :mod:`.pdl` -- programmatic dependent launch: the switch and the ``@triton.jit`` phases;
* :mod:`.helpers` -- ``@triton.jit`` helpers used by more than one family (rounding, the fused-edge
  epilogue, the split-K store / reduction, the dot) and their host-side partners (``inv_k``, ``split_k``);
* :mod:`.tuning` -- the one tuning mechanism: ``triton.autotune`` config lists, and per-GPU tables of
  measured configs (``fxspec/lowering/tuned_tables/<GPU name>.json``) that any family's launcher consults
  by kernel and shape.

Launch-time switches (PDL, the int4 packed GEMV, the tables, ...) come from :mod:`fxspec.lowering.settings`.
"""
