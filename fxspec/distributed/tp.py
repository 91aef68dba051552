"""Tensor-parallel decode: shard a transformers decoder over N processes with DTensor's parallel styles.

``shard_for_tp(model, 2)`` (inside a ``torchrun --nproc-per-node 2`` job) or ``fxspec.Generator(model, ...,
tp=2)`` shards every decoder layer Megatron-style::

    attention:  q_proj, k_proj, v_proj   column-wise (Shard(0) of the weight): rank r keeps heads r*H/N .. and
                                          KV heads r*Hkv/N .., so each rank attends over its own KV-head groups
                o_proj                   row-wise (Shard(1)): a partial sum per rank, then one all-reduce
    FFN:        gate_proj, up_proj       column-wise: rank r keeps FFN columns r*I/N ..
                down_proj                row-wise, then one all-reduce
    fused:      qkv_proj = [q; k; v]     each part column-wise on its own: rank r keeps [q_r; k_r; v_r]
                gate_up_proj = [g; u]    likewise [g_r; u_r] (Phi-3), so the model's own split stays right
    replicated: embeddings, norms, the LM head, rotary tables

Two all-reduces per layer per step, nothing else. The KV cache of each rank holds only its KV heads
(``TensorParallelInfo.static_cache``).

Parameters end as **local tensors**, not DTensors. The sharding itself is PyTorch's: the plan uses
``parallelize_module`` with subclasses of ``ColwiseParallel`` / ``RowwiseParallel`` whose placements and
``distribute_tensor`` calls are the stock ones (rank 0's weights are scattered; ``src_data_rank``), and only the
last step differs: each parameter becomes its rank's shard (``DTensor.to_local()``) and the row-wise layers
all-reduce their output with ``torch.distributed._functional_collectives.all_reduce``. Why (measured with torch
2.13, 2 gloo processes, a tiny Llama):

* with the stock styles (DTensor parameters), Dynamo hands the backend a graph whose weight placeholders are
  DTensors of the *global* shape; fxspec's lossless path compiles it, but ``[quantize]`` packs a weight into
  ``torch.ops.fxspec.int8_linear``, which has no DTensor sharding strategy ("Operator fxspec.int8_linear.default
  does not have a sharding strategy registered"), and the backend falls back to plain Inductor;
* with local shards the backend sees an ordinary graph with smaller linears and the collectives as
  ``_c10d_functional.all_reduce`` / ``wait_tensor`` nodes: every pass (quantization packs each rank's shard,
  the frozen-weight guard watches the local tensors, decode fusions group each rank's own q/k/v) runs unchanged,
  and the compiled output equals the unsharded model's up to the float rounding of the all-reduce.

This is inference only (``funcol.all_reduce`` has no backward here); training shards with FSDP2
(:mod:`fxspec.distributed.fsdp`).

Recognised layouts (by module structure): decoder layers at ``model.<base>.layers`` with ``self_attn`` holding
``q_proj``/``k_proj``/``v_proj``/``o_proj`` (Llama, Mistral, Qwen2/3, Gemma, ...) or ``qkv_proj``/``o_proj``
(Phi-3), and ``mlp`` holding ``gate_proj``/``up_proj``/``down_proj`` or ``gate_up_proj``/``down_proj``, all
``nn.Linear``. Anything else (MoE blocks, GPT-2's Conv1D, GPT-NeoX's per-head interleaved ``query_key_value``)
is a ``NotImplementedError`` naming what was found. Query heads, KV heads and the FFN width must divide by N:
KV heads are split, never replicated.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from .mesh import check_size, mesh_device, mesh_for

__all__ = ["TensorParallelInfo", "shard_for_tp", "tp_info", "for_generator", "LocalColwiseParallel",
           "LocalRowwiseParallel", "PackedColwiseParallel"]

#: the attribute of a sharded model that holds its TensorParallelInfo
_ATTR = "_fxspec_tp"


@dataclass(frozen=True)
class TensorParallelInfo:
    """How a model was sharded, and the per-rank geometry the runtime needs."""

    mesh: DeviceMesh
    size: int           # processes the layers are sharded over
    rank: int           # this process's coordinate on the mesh
    layers: int
    heads: int          # query heads per rank
    kv_heads: int       # KV heads per rank (the KV cache's)
    head_dim: int
    intermediate: int   # FFN columns per rank
    fused: bool         # fused q/k/v and gate/up projections (split part by part)

    def local_text_config(self, config):
        """A shallow copy of the model's text config with this rank's head counts (the KV cache reads them)."""
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        local = copy.copy(text)
        local.num_attention_heads = self.heads
        local.num_key_value_heads = self.kv_heads
        local.head_dim = self.head_dim
        return local

    def static_cache(self, model: nn.Module, batch_size: int, max_cache_len: int, dtype: torch.dtype,
                     device: torch.device):
        """``fxspec.runtime.cache.make_hf_static_cache`` for this rank: ``[B, Hkv / N, L, D]`` per layer."""
        from ..runtime.cache import make_hf_static_cache

        # make_hf_static_cache reads .config (and names the model's class in its errors): a stand-in with the
        # rank's config, under the model's class name
        view = type(type(model).__name__, (), {"config": self.local_text_config(model.config)})()
        return make_hf_static_cache(view, batch_size, max_cache_len, dtype, device)


# --- the parallel styles --------------------------------------------------------------------------------


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it when it is a view into a larger storage (a shard taken from the whole weight
    without communication is a view of it: keeping the view would keep the whole weight in memory)."""
    if t.is_meta or t.untyped_storage().nbytes() <= t.numel() * t.element_size():
        return t
    return t.clone()


def _localize(module: nn.Module) -> None:
    """Replace the module's DTensor parameters by this rank's shards (plain tensors)."""
    for name, p in list(module.named_parameters(recurse=False)):
        local = _own(p.to_local() if hasattr(p, "to_local") else p.detach())
        module.register_parameter(name, nn.Parameter(local, requires_grad=p.requires_grad))


def _check_linear(module: nn.Module, style: str) -> None:
    if type(module) is not nn.Linear:
        raise NotImplementedError(f"{style} shards nn.Linear modules only (got {type(module).__name__})")


class LocalColwiseParallel(ColwiseParallel):
    """``ColwiseParallel``'s sharding (weight and bias ``Shard(0)``), ending as local shards with no hooks: the
    input is already replicated on every rank, and the output stays this rank's columns (its heads, its FFN
    columns), which is what the next layer of the plan reads."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _check_linear(module, type(self).__name__)
        self._partition_linear_fn("", module, device_mesh)
        _localize(module)
        module.out_features = module.weight.shape[0]
        return module


class PackedColwiseParallel(LocalColwiseParallel):
    """Column-wise sharding of a linear whose output concatenates ``parts`` (rows of the weight), e.g. Phi-3's
    ``qkv_proj`` = ``[q; k; v]``: each part is sharded on its own (``distribute_tensor(part, Shard(0))``) and rank
    ``r`` keeps ``[q_r; k_r; v_r]``, so the model's split of the output by local sizes stays right."""

    def __init__(self, parts: tuple[int, ...]):
        super().__init__()
        self.parts = tuple(int(p) for p in parts)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _check_linear(module, type(self).__name__)
        if sum(self.parts) != module.weight.shape[0]:
            raise ValueError(f"PackedColwiseParallel: parts {self.parts} do not add up to the layer's "
                             f"{module.weight.shape[0]} output features")
        for name, p in list(module.named_parameters(recurse=False)):
            pieces = p.detach().split(self.parts, dim=0)
            local = torch.cat([distribute_tensor(x, device_mesh, [Shard(0)], src_data_rank=self.src_data_rank)
                               .to_local() for x in pieces])
            module.register_parameter(name, nn.Parameter(local, requires_grad=p.requires_grad))
        module.out_features = module.weight.shape[0]
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}(parts={self.parts})"


class LocalRowwiseParallel(RowwiseParallel):
    """``RowwiseParallel``'s sharding (weight ``Shard(1)``, bias replicated), ending as local shards, with one
    ``funcol.all_reduce`` of the output (a forward hook): each rank's partial product over its input columns is
    summed into the replicated output. A bias is added after the sum (``reduced_bias``), not N times."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _check_linear(module, type(self).__name__)
        self._partition_linear_fn("", module, device_mesh)
        _localize(module)
        module.in_features = module.weight.shape[1]
        bias = module.bias
        if bias is not None:
            module.register_parameter("bias", None)
            module.register_parameter("reduced_bias", bias)

        def all_reduce_output(mod: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
            out = funcol.all_reduce(output, "sum", device_mesh)  # B, T, hidden: the full product on every rank
            extra = getattr(mod, "reduced_bias", None)
            return out if extra is None else out + extra

        module.register_forward_hook(all_reduce_output)
        return module


# --- recognising the model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise NotImplementedError(
            f"tensor parallelism: {type(model).__name__} is not a recognised decoder (no `layers` ModuleList under "
            f"its base model); supported: transformers decoders of the Llama layout (Llama, Mistral, Qwen2/3, "
            f"Gemma, Phi-3, ...)")
    return layers


def _geometry(model: nn.Module, layers: nn.ModuleList) -> _Geometry:
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return _Geometry(len(layers), int(heads), int(kv), int(head_dim), int(cfg.intermediate_size))


def _child(module: nn.Module, name: str) -> nn.Module | None:
    m = getattr(module, name, None)
    return m if isinstance(m, nn.Module) else None


def _layer_plan(layer: nn.Module, index: int, g: _Geometry) -> tuple[dict[str, ParallelStyle], bool]:
    """The styles of one decoder layer (paths relative to it) and whether its projections are fused."""
    where = f"layer {index} ({type(layer).__name__})"
    attn, mlp = _child(layer, "self_attn"), _child(layer, "mlp")
    if attn is None or mlp is None:
        raise NotImplementedError(f"tensor parallelism: {where} has no `self_attn` and `mlp` submodules; "
                                  f"supported: the Llama layout (see fxspec.distributed.tp)")
    plan: dict[str, ParallelStyle] = {}
    q, k, v, qkv = (_child(attn, n) for n in ("q_proj", "k_proj", "v_proj", "qkv_proj"))
    if q is not None and k is not None and v is not None:
        plan.update({"self_attn.q_proj": LocalColwiseParallel(), "self_attn.k_proj": LocalColwiseParallel(),
                     "self_attn.v_proj": LocalColwiseParallel()})
        want = {"q_proj": (q, g.heads), "k_proj": (k, g.kv_heads), "v_proj": (v, g.kv_heads)}
    elif qkv is not None:
        plan["self_attn.qkv_proj"] = PackedColwiseParallel((g.heads * g.head_dim, g.kv_heads * g.head_dim,
                                                            g.kv_heads * g.head_dim))
        want = {"qkv_proj": (qkv, g.heads + 2 * g.kv_heads)}
    else:
        names = ", ".join(n for n, _ in attn.named_children()) or "none"
        raise NotImplementedError(f"tensor parallelism: {where}'s attention ({type(attn).__name__}) has neither "
                                  f"q_proj/k_proj/v_proj nor a fused qkv_proj (its children: {names})")
    for name, (lin, n_heads) in want.items():
        if isinstance(lin, nn.Linear) and lin.out_features != n_heads * g.head_dim:
            raise NotImplementedError(f"tensor parallelism: {where} {name} has {lin.out_features} outputs, not "
                                      f"{n_heads} heads x head_dim {g.head_dim} as the config says")
    if _child(attn, "o_proj") is None:
        raise NotImplementedError(f"tensor parallelism: {where}'s attention has no o_proj")
    plan["self_attn.o_proj"] = LocalRowwiseParallel()
    gate, up, gate_up = (_child(mlp, n) for n in ("gate_proj", "up_proj", "gate_up_proj"))
    if gate is not None and up is not None:
        plan.update({"mlp.gate_proj": LocalColwiseParallel(), "mlp.up_proj": LocalColwiseParallel()})
    elif gate_up is not None:
        plan["mlp.gate_up_proj"] = PackedColwiseParallel((g.intermediate, g.intermediate))
    else:
        names = ", ".join(n for n, _ in mlp.named_children()) or "none"
        raise NotImplementedError(f"tensor parallelism: {where}'s FFN ({type(mlp).__name__}) is not a gated FFN "
                                  f"with gate_proj/up_proj or gate_up_proj (its children: {names}); MoE blocks are "
                                  f"not sharded yet")
    if _child(mlp, "down_proj") is None:
        raise NotImplementedError(f"tensor parallelism: {where}'s FFN has no down_proj")
    plan["mlp.down_proj"] = LocalRowwiseParallel()
    for path in plan:
        mod = layer.get_submodule(path)
        if type(mod) is not nn.Linear:
            raise NotImplementedError(f"tensor parallelism: {where} {path} is a {type(mod).__name__}, not an "
                                      f"nn.Linear (quantized or wrapped layers are sharded before, not after)")
    return plan, qkv is not None or gate_up is not None


def _check_divisible(g: _Geometry, n: int) -> None:
    problems = [f"{what} {count}" for what, count in (("attention heads", g.heads), ("KV heads", g.kv_heads),
                                                     ("FFN width", g.intermediate)) if count % n]
    if problems:
        ok = [d for d in range(1, 65) if g.heads % d == 0 and g.kv_heads % d == 0 and g.intermediate % d == 0]
        raise ValueError(f"tp={n}: the model's {', '.join(problems)} {'is' if len(problems) == 1 else 'are'} not "
                         f"divisible by {n}. Each rank keeps 1/tp of the query heads, of the KV heads (KV heads are "
                         f"split, never replicated) and of the FFN columns; tp values that work for this model: "
                         f"{', '.join(map(str, ok))}")


# --- the entry points -----------------------------------------------------------------------------------


def tp_info(model: nn.Module) -> TensorParallelInfo | None:
    """How :func:`shard_for_tp` sharded ``model`` (None: not sharded)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, _ATTR, None)


def shard_for_tp(model: nn.Module, mesh_or_tp: DeviceMesh | int, *, src_data_rank: int | None = 0) -> nn.Module:
    """Shard ``model``'s decoder layers over ``mesh_or_tp`` in place (see the module docstring); returns it.

    ``mesh_or_tp``: the number of processes (a 1-D mesh over the whole job: it must equal the world size) or a
    1-D ``DeviceMesh``. ``src_data_rank``: whose weights are scattered (``distribute_tensor``'s argument; ``None``
    takes each rank's own copy without communication, when every rank loaded the same checkpoint). The model
    may be on the CPU: its shards and replicated parts move to this rank's device of the mesh. A model on the
    meta device is sharded as meta tensors (nothing is allocated or sent): materialise each rank's part
    afterwards (``model.to_empty(device=...)``, then load or initialise it; ``benchmarks/tp_decode.py`` does).
    Greedy decoding of the sharded model gives the unsharded model's tokens (float rounding of the all-reduce
    aside).
    """
    model = getattr(model, "_orig_mod", model)
    if not hasattr(model, "config"):
        raise NotImplementedError(f"tensor parallelism needs a transformers model (got {type(model).__name__}); "
                                  f"plain-contract modules are not sharded")
    mesh = mesh_for(mesh_or_tp, "tp")
    n = mesh.size()
    done = tp_info(model)
    if done is not None:
        if done.size != n:
            raise ValueError(f"the model is already sharded over {done.size} processes; cannot shard it again over "
                             f"{n} (load a fresh copy)")
        return model
    layers = _decoder_layers(model)
    g = _geometry(model, layers)
    _check_divisible(g, n)
    plans = [_layer_plan(layer, i, g) for i, layer in enumerate(layers)]  # check every layer before changing any
    if n > 1:
        for layer, (plan, _) in zip(layers, plans):
            parallelize_module(layer, mesh, plan, src_data_rank=src_data_rank)
            _make_attention_local(layer.self_attn, g, n)
    if not any(p.is_meta for p in model.parameters()):
        model.to(mesh_device(mesh))
    info = TensorParallelInfo(mesh=mesh, size=n, rank=mesh.get_local_rank(), layers=g.layers, heads=g.heads // n,
                              kv_heads=g.kv_heads // n, head_dim=g.head_dim, intermediate=g.intermediate // n,
                              fused=any(fused for _, fused in plans))
    setattr(model, _ATTR, info)
    return model


def _make_attention_local(attn: nn.Module, g: _Geometry, n: int) -> None:
    """Head counts the attention module keeps (or reads from its config) become this rank's.

    transformers 5 Llama-layout attention reshapes with ``view(*shape, -1, head_dim)`` and keeps
    ``num_key_value_groups = H / Hkv`` (unchanged by the split), so it needs nothing; attributes that older or
    other modules keep (``num_heads``, ``num_key_value_heads``) are set, and a module that splits a fused
    projection by ``self.config.num_attention_heads`` (Phi-3) gets a config copy with the local counts.
    """
    for name, value in (("num_heads", g.heads), ("num_attention_heads", g.heads),
                        ("num_key_value_heads", g.kv_heads), ("num_kv_heads", g.kv_heads)):
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, value // n)
    if _child(attn, "qkv_proj") is not None and hasattr(attn, "config"):
        local = copy.copy(attn.config)
        local.num_attention_heads = g.heads // n
        local.num_key_value_heads = g.kv_heads // n
        local.head_dim = g.head_dim
        attn.config = local


def for_generator(model: nn.Module, tp: int | None) -> TensorParallelInfo | None:
    """What ``fxspec.Generator(model, ..., tp=tp)`` decodes with: ``tp=None`` takes the model as it is (sharded
    already by :func:`shard_for_tp`, or not); ``tp=N`` shards it over the N processes of the job (or checks
    that it already is); ``tp=1`` is one process."""
    info = tp_info(model)
    if tp is None:
        return info
    tp = check_size(tp, "tp")
    if info is not None:
        if info.size != tp:
            raise ValueError(f"tp={tp}, but the model is already sharded over {info.size} processes")
        return info
    if tp == 1:
        return None
    shard_for_tp(model, tp)
    return tp_info(model)

