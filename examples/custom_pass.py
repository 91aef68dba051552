"""Your own pass in a few lines: exact GELU in the FFN blocks -> its tanh approximation.

    python examples/custom_pass.py          # a tiny random BERT on the CPU, a few seconds

The pass below uses only the public pass API (``fxspec.register_pass``, the ``PassContext`` it gets, the graph
analysis and the node helpers of ``fxspec.graph``). Before / after, in each FFN block that the analysis finds::

    h = F.gelu(up(x))                          h = F.gelu(up(x), approximate="tanh")
    y = down(h)                         ->     y = down(h)

It is lossy (the tanh form differs from erf by up to ~5e-4 per element), so it is registered with
``lossy=True``: it runs only when a config names it in ``passes``; with the default option it only notes the
blocks it would rewrite, and ``approximate = "tanh"`` makes it rewrite them. From a TOML file instead of
Python (the module must be importable, e.g. on ``PYTHONPATH``)::

    passes = [{fn = "custom_pass:gelu_tanh", after = "quantize_weights"}]

    [pass_options.gelu_tanh]
    approximate = "tanh"
    layers = ["encoder.layer.0.*"]

or on the command line, ``fxspec inspect hf:bert --set passes=custom_pass:gelu_tanh --set
pass_options.gelu_tanh.approximate=tanh``; ``fxspec config --schema --set passes=custom_pass:gelu_tanh`` lists the
options below with their types, defaults and the comments at the end of their lines.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

import fxspec
from fxspec.graph.nodes import arg, is_op, skip_back
from fxspec.graph.rewrite import eliminate_dead_code


@dataclass
class GeluTanhOptions:
    """``[pass_options.gelu_tanh]``, checked like fxspec's own sections (unknown keys, wrong types)."""

    approximate: str = "none"  # "tanh": rewrite; "none": only note the blocks that would be rewritten
    layers: list[str] = field(default_factory=lambda: ["*"])  # fnmatch patterns over FFN names

    def __post_init__(self) -> None:
        if self.approximate not in ("none", "tanh"):
            raise ValueError(f"approximate = {self.approximate!r} is not allowed; choose 'none' or 'tanh'")


@fxspec.register_pass(lossy=True, options=GeluTanhOptions)
def gelu_tanh(gm: fx.GraphModule, ctx) -> fx.GraphModule:
    """FFN activations F.gelu(x) -> F.gelu(x, approximate="tanh") (lossy; [pass_options.gelu_tanh])."""
    opts: GeluTanhOptions = ctx.options
    for ffn in ctx.analysis(gm).ffns:
        if not any(fnmatch.fnmatch(ffn.name, pat) for pat in opts.layers):
            continue
        if ffn.kind != "plain" or ffn.activation != "gelu":
            ctx.skip(ffn.name, f"{ffn.kind} FFN with {ffn.activation}, not a plain FFN with exact gelu")
            continue
        act = skip_back(ffn.down.input)  # the down projection's input, through casts
        if not is_op(act, "gelu") or arg(act, 1, "approximate", "none") != "none":
            ctx.skip(ffn.name, "the gelu is written out, not one F.gelu call")
            continue
        if opts.approximate == "none":
            ctx.note(ffn.name, "exact gelu; pass_options.gelu_tanh.approximate = 'tanh' would rewrite it")
            continue
        with gm.graph.inserting_after(act):
            new = gm.graph.call_function(F.gelu, (act.args[0],), {"approximate": "tanh"})
        new.meta = dict(act.meta)  # same shape and dtype: later passes read them
        act.replace_all_uses_with(new)
        ctx.rewrote(ffn.name, "F.gelu -> F.gelu(approximate='tanh')", counter="gelu_tanh")
    eliminate_dead_code(gm)
    return gm


def tiny_bert(hidden_act: str = "gelu") -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, hidden_act=hidden_act)
    return BertModel(cfg).eval()


def main() -> dict[str, float]:
    model = tiny_bert()
    tanh_ref = tiny_bert("gelu_pytorch_tanh")  # the same weights with the tanh GELU: what the rewrite computes
    tanh_ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, 128, (2, 16))
    config = {"passes": ["gelu_tanh"], "pass_options": {"gelu_tanh": {"approximate": "tanh"}}}
    print(fxspec.pipeline(config))

    torch._dynamo.reset()
    fxspec.reset_counters()
    with torch.no_grad():
        eager = model(ids).last_hidden_state
        out = fxspec.compile(model, config)(ids).last_hidden_state
        ref = tanh_ref(ids).last_hidden_state
    for e in fxspec.recent_reports[-1].events:
        print(" ", e)
    result = {
        "rewrites": float(fxspec.counters["gelu_tanh"]["gelu_tanh"]),
        "max_diff_vs_eager_erf": float((out - eager).abs().max()),
        "max_diff_vs_eager_tanh": float((out - ref).abs().max()),
    }
    print(f"rewrote {result['rewrites']:.0f} FFN activations; max |compiled - eager (erf gelu)| = "
          f"{result['max_diff_vs_eager_erf']:.2e}; max |compiled - eager (tanh gelu)| = "
          f"{result['max_diff_vs_eager_tanh']:.2e}")
    return result


if __name__ == "__main__":
    main()
