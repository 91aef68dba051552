"""Quantization numerics shared by passes and tools: the format registry (:mod:`.formats`) and calibration
statistics with the AWQ / GPTQ math (:mod:`.calibration`). The kernels and the packers live in
``fxspec.lowering.quant``; nothing here runs a model."""

from .formats import FORMATS, INT4_GROUP_SIZES, QuantFormat, format_for, format_of_op, int4_group_size

__all__ = ["FORMATS", "INT4_GROUP_SIZES", "QuantFormat", "format_for", "format_of_op", "int4_group_size"]
