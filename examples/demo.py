"""The main demo: compile a small Llama with fxspec, print what fxspec found, check it against eager.

    python examples/demo.py                 # a tiny random-weight Llama (no downloads)
    python examples/demo.py --model ../shared/ref-lm   # the trained reference model, if you have it

Steps: (1) ``torch.compile(model, backend="fxspec")`` with the lossless default: outputs must equal
eager's within float tolerance; (2) the inspection report; (3) the same model with int8 weights
(``options={"quantize": {"bits": 8}}``): the report shows each rewrite, and the demo prints the
logits' SQNR against the float model and the greedy next-token agreement.
"""

from __future__ import annotations

import argparse
import time

import torch


def build(model_path: str | None):
    from transformers import LlamaConfig, LlamaForCausalLM

    if model_path:
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=1024, max_position_embeddings=256)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a transformers model directory (default: tiny random Llama)")
    ap.add_argument("--seq-len", type=int, default=32)
    args = ap.parse_args()

    import fxspec

    model = build(args.model)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits

        t0 = time.perf_counter()
        compiled = torch.compile(model, backend="fxspec")
        out = compiled(ids).logits
        print(f"[1] compiled with backend='fxspec' in {time.perf_counter() - t0:.1f} s; "
              f"max |compiled - eager| = {(out - ref).abs().max().item():.2e}")
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        print("    matches eager (rtol=atol=1e-4)")

        print("\n[2] fxspec.explain(model, ids, config={'quantize': {'bits': 8}}):")
        print(fxspec.explain(model, ids, config={"quantize": {"bits": 8}}))

        torch._dynamo.reset()
        fxspec.reset_counters()
        q = torch.compile(model, backend="fxspec", options={"quantize": {"bits": 8}})
        qout = q(ids).logits
        agree = (qout.argmax(-1) == ref.argmax(-1)).float().mean().item()
        print(f"\n[3] int8 weights: {fxspec.counters['quantize_weights']['int8']} linears quantized; logits SQNR "
              f"{sqnr_db(ref, qout):.1f} dB; greedy next-token agreement {agree:.1%}")
        if fxspec.counters["backend"]["fallback"]:
            raise SystemExit("fxspec fell back to plain Inductor; see the warning above")
    print("\ndemo OK")


if __name__ == "__main__":
    main()
