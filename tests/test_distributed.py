"""Tests of ``fxspec.distributed``: tensor-parallel decode (``shard_for_tp``, ``Generator(..., tp=N)``) and FSDP2
training with the config opt-in (``fully_shard_model``).

The CPU tests run 2 processes with the ``gloo`` backend (``torch.multiprocessing.spawn``; the process group meets
through a file in the test's temporary directory, so no port is chosen) on tiny random float32 models, and
compare each rank's results against the unsharded model computed in the same process. Each spawn starts two
fresh interpreters (~5-10 s of imports on a 2-core CPU) and bundles several checks. The GPU tests run the same
checks over NCCL with CUDA graphs and skip with fewer than 2 GPUs.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers")

import fxspec  # noqa: E402
from fxspec.distributed import fully_shard_model, shard_for_tp, tp_info  # noqa: E402

WORLD = 2
VOCAB = 128
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL, one process per GPU)")


# --- models and the process harness ---------------------------------------------------------------------


def tiny(family: str = "llama", seed: int = 0, **overrides):
    """A tiny random model: hidden 64, 4 heads, 2 KV heads, 2 layers, vocab 128, float32."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    common.update(overrides)
    cfg = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "phi3": transformers.Phi3Config}[family](**common)
    if family == "phi3":
        cfg.pad_token_id = 0
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.eos_token_id = None  # never stop early: every step is compared
    model.generation_config.pad_token_id = 0
    return model


def _entry(rank: int, world: int, init_file: str, check_name: str, backend: str, kwargs: dict) -> None:
    """One process: join the group, run the named check, leave."""
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        globals()[check_name](rank, **kwargs)
        dist.barrier()  # no rank leaves while another still talks to it
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path, check, backend: str = "gloo", world: int = WORLD, **kwargs) -> None:
    """Run ``check(rank, **kwargs)`` on ``world`` processes; an exception on any rank fails the test."""
    mp.spawn(_entry, args=(world, str(tmp_path / "pg_init"), check.__name__, backend, kwargs), nprocs=world,
             join=True)


def _prompts(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- checks run on every rank (module level: the spawned processes import them by name) ---------------------


def check_tp_logits(rank: int) -> None:
    ids = _prompts(2, 12)
    for family in ("llama", "qwen2", "phi3"):  # separate q/k/v (Qwen2: with biases), fused qkv / gate_up (Phi-3)
        ref, model = tiny(family), tiny(family)
        with torch.no_grad():
            want = ref(ids).logits
        shard_for_tp(model, WORLD)
        info = tp_info(model)
        assert (info.size, info.rank, info.heads, info.kv_heads, info.intermediate) == (2, rank, 2, 1, 64)
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        if family == "phi3":
            assert attn.qkv_proj.weight.shape == (2 * 16 + 2 * 16, 64)  # [q_r; k_r; v_r]: 2 heads + 1 + 1
            assert mlp.gate_up_proj.weight.shape == (128, 64)
            q_rows = ref.model.layers[0].self_attn.qkv_proj.weight[rank * 32:(rank + 1) * 32]
            assert torch.equal(attn.qkv_proj.weight[:32], q_rows)  # the query part of this rank's heads
        else:
            assert type(attn.q_proj.weight) is torch.nn.Parameter  # local shards, not DTensors
            assert attn.q_proj.weight.shape == (32, 64) and attn.k_proj.weight.shape == (16, 64)
            assert attn.o_proj.weight.shape == (64, 32) and mlp.down_proj.weight.shape == (64, 64)
            assert torch.equal(attn.k_proj.weight, ref.model.layers[0].self_attn.k_proj.weight[rank * 16:][:16])
        with torch.no_grad():
            got = model(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{family} rank {rank}")
    # a row-wise layer with a bias adds it once, after the all-reduce
    ref, model = tiny("llama", attention_bias=True), tiny("llama", attention_bias=True)
    with torch.no_grad():
        want = ref(ids).logits
        got = shard_for_tp(model, WORLD)(ids).logits
    assert model.model.layers[0].self_attn.o_proj.bias is None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def check_tp_errors(rank: int) -> None:
    with pytest.raises(ValueError, match=r"KV heads 1 is not divisible by 2.*tp values that work for this model: 1"):
        shard_for_tp(tiny(num_key_value_heads=1), 2)
    with pytest.raises(ValueError, match="FFN width 129"):
        shard_for_tp(tiny(intermediate_size=129), 2)
    with pytest.raises(ValueError, match="tp=4 but the job has 2 processes"):
        shard_for_tp(tiny(), 4)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=VOCAB))
    with pytest.raises(NotImplementedError, match="not a recognised decoder"):
        shard_for_tp(gpt2, 2)
    mixtral = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1))
    with pytest.raises(NotImplementedError, match="MoE blocks are not sharded yet"):
        shard_for_tp(mixtral, 2)
    model = shard_for_tp(tiny(), 2)
    with pytest.raises(ValueError, match="tp=1, but the model is already sharded over 2"):
        fxspec.Generator(model, 1, 64, compile=False, tp=1)
    gen = fxspec.Generator(model, 1, 64, compile=False)  # a model sharded beforehand is served sharded
    assert gen.tp is tp_info(model)
    with pytest.raises(ValueError, match="needs seed"):
        gen.generate(_prompts(1), 4, do_sample=True)


def check_generator(rank: int, compile: bool, config: dict | None = None, ref_compile: bool = False,
                    compile_prefill: bool = True, new: int = 12) -> None:
    """Greedy tokens of tp=2 equal tp=1's (one process; eager unless ``ref_compile``: a config only applies to
    compiled steps), for a full and a ragged batch."""
    ids = _prompts(2, 7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    kw = dict(compile=compile, config=config, cuda_graphs=False, compile_prefill=compile_prefill)
    ref = fxspec.Generator(tiny(), 2, 64, **{**kw, "compile": ref_compile})
    want = [ref.generate(ids, new), ref.generate(ids, new, attention_mask=mask)]
    gen = fxspec.Generator(tiny(), 2, 64, tp=WORLD, **kw)
    layer0 = gen.cache.layers[0]
    assert layer0.keys.shape == (2, 1, 64, 16)  # this rank's one KV head of the model's two
    got = [gen.generate(ids, new), gen.generate(ids, new, attention_mask=mask)]
    for g, w in zip(got, want):
        assert torch.equal(g, w), f"rank {rank}: tp=2 tokens {g.tolist()} != tp=1 tokens {w.tolist()}"
    if compile and config and "quantize" in config:
        assert fxspec.counters["quantize_weights"]["int8"] > 0  # each rank packed its own shards


def check_fsdp_config_opt_in(rank: int, steps: int = 3, device: str = "cpu") -> None:
    """FSDP2 + fxspec's config opt-in for draft heads and attention gates, on 2 processes (each half the batch),
    gives the single-process losses and trained modules (whole batch)."""
    config = {"draft_heads": {"type": "medusa", "num_heads": 2}, "sparse_attention": {"mode": "seer", "block": 16}}
    batches = [torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(s)).to(device)
               for s in range(steps)]

    def train(model, compiled, world, rank):
        # SGD: Adam's first steps move every weight by about lr whatever the gradient's size, so the float
        # rounding of a gradient near zero (which differs between 1 and 2 processes) would decide its sign
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        model.train()
        losses = []
        for ids in batches:
            ids = ids.chunk(world)[rank]
            out = compiled(ids, labels=ids, use_cache=False)
            aux = fxspec.aux_loss(model)  # the heads' and the gates' terms
            (out.loss + aux).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            pair = torch.stack([out.loss.detach(), aux.detach()])
            if world > 1:
                dist.all_reduce(pair)
                pair /= world
            losses.append(pair)
        return torch.stack(losses)

    def frozen_base():
        model = tiny().to(device)
        for p in model.parameters():
            p.requires_grad_(False)  # the modules fxspec.compile attaches train; the base does not
        return model

    single = frozen_base()
    want = train(single, fxspec.compile(single, config), 1, 0)

    model = frozen_base()
    compiled = fxspec.compile(model, config)
    with pytest.raises(ValueError, match="per_layer=True with draft heads or attention gates"):
        fully_shard_model(model, config, per_layer=True)
    with pytest.raises(ValueError, match="pass the config"):
        fully_shard_model(model)
    fully_shard_model(model, config)
    assert type(model.model.layers[0].mlp.up_proj.weight).__name__ == "DTensor"  # the base is sharded
    assert type(model.lm_head.weight) is torch.nn.Parameter  # what the draft-heads pass reads stays whole
    got = train(model, compiled, WORLD, rank)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for attr in ("fxspec_draft_heads", "fxspec_attention_gates"):
        mine, ref = getattr(model, attr), getattr(single, attr)
        for (name, p), q in zip(mine.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-6, msg=f"{attr}.{name}")
    heads = single.fxspec_draft_heads.named_parameters()
    assert all(q.abs().max() > 0 for name, q in heads if "linear.weight" in name)  # trained: they start at zero


def check_fsdp_base_training(rank: int, steps: int = 2) -> None:
    """Per-layer FSDP2 units (no fxspec training module attached): fine-tuning the whole base through fxspec's
    lossless compile gives the losses of the eager model trained on one process."""
    batches = [torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(s)) for s in range(steps)]

    def train(model, world, rank):
        compiled = fxspec.compile(model, {}) if world > 1 else model
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model.train()
        out = []
        for ids in batches:
            loss = compiled(ids.chunk(world)[rank], labels=ids.chunk(world)[rank]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = loss.detach()
            if world > 1:
                dist.all_reduce(loss)
                loss /= world
            out.append(loss)
        return torch.stack(out)

    want = train(tiny(), 1, 0)
    model = tiny()
    fully_shard_model(model)
    assert type(model.lm_head.weight).__name__ == "DTensor"  # nothing attached: the root shards the LM head too
    torch.testing.assert_close(train(model, WORLD, rank), want, rtol=1e-4, atol=1e-5)


# --- the tests --------------------------------------------------------------------------------------------


def test_tp_logits_equal_unsharded(tmp_path):
    run_ranks(tmp_path, check_tp_logits)


def test_tp_bad_models_and_sizes(tmp_path):
    run_ranks(tmp_path, check_tp_errors)


def test_generator_tp_eager_tokens_equal_tp1(tmp_path):
    run_ranks(tmp_path, check_generator, compile=False)


def test_generator_tp_compiled_tokens_equal_tp1(tmp_path):
    run_ranks(tmp_path, check_generator, compile=True)


def test_generator_tp_int8_tokens_equal_tp1(tmp_path):
    # int8 scales are per output channel: a column-wise shard keeps its rows' scales, a row-wise shard's scales
    # come from its own input columns (not bit-identical to tp=1's; the tiny model's greedy tokens agree). The
    # decode step only is compiled (one compile per process and setting, to keep the test short).
    run_ranks(tmp_path, check_generator, compile=True, ref_compile=True, compile_prefill=False,
              config={"quantize": {"bits": 8}})


def test_tp_argument_errors_without_a_job():
    model = tiny()
    with pytest.raises(RuntimeError, match=r"torchrun --nproc-per-node 2"):
        fxspec.Generator(model, 1, 64, compile=False, tp=2)
    with pytest.raises(ValueError, match="tp must be >= 1"):
        fxspec.Generator(model, 1, 64, compile=False, tp=0)
    for bad in ("2", 2.0, True):
        with pytest.raises(TypeError, match="tp must be an int"):
            fxspec.Generator(model, 1, 64, compile=False, tp=bad)
    with pytest.raises(NotImplementedError, match="speculative decoding"):
        fxspec.Generator(model, 1, 64, compile=False, tp=2, config={"draft_heads": {"type": "medusa"}})
    assert fxspec.Generator(model, 1, 64, compile=False, tp=1).tp is None  # one process: nothing to shard
    assert tp_info(model) is None


def test_fsdp_draft_heads_and_gates_losses_equal_single_process(tmp_path):
    run_ranks(tmp_path, check_fsdp_config_opt_in)


def test_fsdp_per_layer_base_training_losses_equal_single_process(tmp_path):
    run_ranks(tmp_path, check_fsdp_base_training)


def test_fully_shard_model_needs_a_job():
    with pytest.raises(RuntimeError, match="torchrun"):
        fully_shard_model(tiny())


# --- several GPUs -----------------------------------------------------------------------------------------


def check_generator_cuda(rank: int, config: dict | None = None, min_agree: float = 1.0) -> None:
    """tp=2 over NCCL with the CUDA-graphed decode step: greedy tokens equal tp=1's on one GPU (at least
    ``min_agree`` of them). float32: in bf16 the all-reduce's other summation order could flip a near tie of the
    random model's logits."""
    ids = _prompts(2, 7).cuda()
    ref = fxspec.Generator(tiny().cuda(), 2, 64, config=config)
    want = ref.generate(ids, 16)
    gen = fxspec.Generator(tiny(), 2, 64, config=config, tp=WORLD)  # sharded from the CPU copy, moved to the GPU
    assert gen.cuda_graphs and gen.device == torch.device("cuda", rank)
    got = gen.generate(ids, 16)
    assert got.shape == want.shape and (got == want).float().mean() >= min_agree, (got.tolist(), want.tolist())


@pytest.mark.gpu
@TWO_GPUS
def test_generator_tp_cuda_graphs_nccl(tmp_path):
    run_ranks(tmp_path, check_generator_cuda, backend="nccl")


@pytest.mark.gpu
@TWO_GPUS
def test_generator_tp_int4_nccl(tmp_path):
    # each rank packs tp=1's int4 codes (group 32 divides the shards' inputs), but the int4 GEMVs compute in bf16:
    # per-rank partial sums round before the all-reduce, so a near tie may flip
    run_ranks(tmp_path, check_generator_cuda, backend="nccl", config={"quantize": {"bits": 4, "group_size": 32}},
              min_agree=0.9)


@pytest.mark.gpu
@TWO_GPUS
def test_fsdp_draft_heads_nccl(tmp_path):
    run_ranks(tmp_path, check_fsdp_config_opt_in, backend="nccl", device="cuda")

