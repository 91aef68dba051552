"""Property test: random small transformer-like stacks through the whole fxspec pipeline.

For each random stack (the generator of the graph-analysis tests) the backend compiles it twice: with
the lossless default (must equal eager within float tolerance) and with int8 weights (every linear is
quantized, the counters say so, and the output stays within a stated SQNR of eager)."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxspec

from .test_graph_analysis import Stack, block_specs
from .tolerances import assert_close


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(d=st.sampled_from([16, 32, 48]), specs=st.lists(block_specs, min_size=1, max_size=2))
def test_random_stacks_through_pipeline(d, specs):
    torch.manual_seed(0)
    m = Stack(d, specs).eval()
    x = torch.randn(2, 5, d)
    with torch.no_grad():
        ref = m(x)
        torch._dynamo.reset()
        fxspec.reset_counters()
        assert_close(torch.compile(m, backend="fxspec", options={"strict": True})(x), ref)
        torch._dynamo.reset()
        out = torch.compile(m, backend="fxspec",
                            options={"strict": True, "quantize": {"bits": 8, "min_features": 1}})(x)
    assert fxspec.counters["backend"]["fallback"] == 0
    assert fxspec.counters["quantize_weights"]["int8"] == 7 * len(specs) - sum(s["ffn"] == "plain" for s in specs)
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())
    assert sqnr > 30, float(sqnr)
