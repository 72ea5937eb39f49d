"""FSDP2 sharding and memory-lean materialisation of the three transformers (spec §12.5).

``G``, ``F`` and the frozen teacher ``T`` are each sharded with ``fully_shard`` per transformer block
(or per group of ``model.fsdp_blocks_per_unit`` consecutive blocks) and then at the root (torchtitan
style; the original wrapped every submodule, which issues far more, smaller all-gathers). Trained nets
keep fp32 master weights and compute in the configured dtype through FSDP2's mixed-precision policy;
the teacher is stored in its own dtype and needs no policy.

Models are built on the meta device on every rank and filled from a full state dict that only rank 0
holds (``broadcast_from_rank0``), so host memory does not scale with the number of ranks.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.utils._pytree import tree_map

from .distributed import DistInfo

logger = logging.getLogger(__name__)

# FLUX's single-stream blocks return views of one tensor; diffusers never modifies them in place, so
# FSDP2's pre-backward hook is intact (gradients are checked against an unsharded model in the tests).
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local shard of a DTensor (FSDP2 parameter, gradient or optimiser state), or the tensor
    itself. Under ``no_grad`` this is the DTensor's own local tensor (same storage, same object)."""
    return t.to_local() if hasattr(t, "to_local") else t


def mixed_precision_policy(compute: str) -> MixedPrecisionPolicy | None:
    """bf16/fp16 compute with fp32 gradient reduction; ``None`` for full fp32."""
    if compute == "fp32":
        return None
    return MixedPrecisionPolicy(param_dtype=DTYPE[compute], reduce_dtype=torch.float32)


def group_blocks(
    blocks: Iterable[nn.Module], per_unit: int, unit_starts: Iterable[nn.Module] = ()
) -> list[list[nn.Module]]:
    """Consecutive ``blocks`` (in their order) in groups of up to ``per_unit``, each group one FSDP2 unit;
    the last group may be shorter. A block marked ``fsdp_compute_fp32`` is a group of its own (it has its
    own mixed-precision policy), and a block in ``unit_starts`` begins a new group."""
    if per_unit < 1:
        raise ValueError(f"per_unit must be >= 1, got {per_unit}")
    starts = {id(b) for b in unit_starts}
    groups: list[list[nn.Module]] = []
    current: list[nn.Module] = []
    for block in blocks:
        alone = getattr(block, "fsdp_compute_fp32", False)
        if current and (alone or id(block) in starts or len(current) == per_unit):
            groups.append(current)
            current = []
        current.append(block)
        if alone:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def device_mesh(device: torch.device):
    """The 1-D mesh of all ranks on ``device``'s type. ``fully_shard`` without a mesh takes the machine's
    accelerator, so a run on the CPU (``device: cpu``) of a machine with a GPU would shard onto the GPU."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def shard(
    model: nn.Module,
    blocks: Iterable[nn.Module],
    mp_policy: MixedPrecisionPolicy | None,
    *,
    device: torch.device,
    blocks_per_unit: int = 1,
    unit_starts: Iterable[nn.Module] = (),
) -> nn.Module:
    """``fully_shard`` each block, or each group of ``blocks_per_unit`` consecutive blocks (see
    :func:`group_blocks`), then the root (which takes the remaining parameters), over all ranks on
    ``device`` (see :func:`device_mesh`).

    A group is one ``fully_shard([block, ...])`` call (list support since torch 2.6): one all-gather
    before its first block's forward, one reduce-scatter after its backward, parameter names unchanged.
    FSDP2 expects the modules of a group to run forward together in every pass: a forward that runs
    only some blocks must end at a group boundary (``unit_starts``).

    Only the root casts its floating-point inputs to the compute dtype. Blocks keep their inputs as
    they are (the engine computes under autocast): FSDP2 skips the cast when activation checkpointing
    recomputes a block in backward, so a block-level cast would make the recomputation differ from
    the forward (e.g. FLUX's fp32 rotary embeddings). Blocks marked ``fsdp_compute_fp32`` (DMD2's
    classifier head) compute in their fp32 storage dtype.
    """
    mesh = device_mesh(device)
    block_policy = fp32_policy = None
    if mp_policy is not None:
        block_policy = dataclasses.replace(mp_policy, cast_forward_inputs=False)
        fp32_policy = MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False)
    for group in group_blocks(blocks, blocks_per_unit, unit_starts):
        policy = fp32_policy if getattr(group[0], "fsdp_compute_fp32", False) else block_policy
        fully_shard(
            group[0] if len(group) == 1 else group,
            mesh=mesh,
            **({"mp_policy": policy} if policy is not None else {}),
        )
    fully_shard(model, mesh=mesh, **({"mp_policy": mp_policy} if mp_policy is not None else {}))
    return model


def _cast_floats(dtype: torch.dtype, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with their floating-point tensors (also nested) cast to ``dtype``."""

    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return tree_map(cast, args), tree_map(cast, kwargs)


def cast_root_inputs(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating-point tensors among ``model``'s forward arguments to ``dtype``, as the root of an
    FSDP2 model with a mixed-precision policy does (``cast_forward_inputs``), so that an unsharded model
    computes on the same activations' dtype as a sharded one (also in the methods registered with
    :func:`register_forward_method`)."""
    model._root_input_dtype = dtype
    model.register_forward_pre_hook(
        lambda m, args, kwargs: _cast_floats(dtype, args, kwargs), with_kwargs=True
    )


def register_forward_method(model: nn.Module, name: str) -> None:
    """Make ``model.<name>`` a forward of the root as ``model.forward`` is: FSDP2 all-gathers the root's
    weights for it and casts its inputs (``register_fsdp_forward_method``); an unsharded model's root
    casts them as :func:`cast_root_inputs` does for ``forward``."""
    if isinstance(model, FSDPModule):
        register_fsdp_forward_method(model, name)
        return
    dtype = getattr(model, "_root_input_dtype", None)
    if dtype is None:
        return
    method = getattr(model, name)

    @functools.wraps(method)
    def cast_then_call(*args, **kwargs):
        args, kwargs = _cast_floats(dtype, args, kwargs)
        return method(*args, **kwargs)

    setattr(model, name, cast_then_call)


def fsdp_units(model: nn.Module) -> list[list[str]]:
    """The FSDP2 units of ``model``: for each, the names of the modules sharded together (``""`` is the
    root), in the order of ``model.named_modules()``. Grouped blocks are each an ``FSDPModule`` sharing
    one FSDP2 state."""
    units: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            units.setdefault(id(fully_shard.state(module)), []).append(name)
    return list(units.values())


def reshard(*nets: nn.Module) -> None:
    """Return FSDP2 roots to their sharded parameters.

    FSDP2 keeps a root's parameters unsharded after forward (expecting a backward); after a
    forward without gradient they would stay unsharded, and shard-wise operations (IDA, state
    dicts) need the sharded DTensors.
    """
    for net in nets:
        if isinstance(net, FSDPModule):
            net.reshard()


def fsdp_modules(net: nn.Module) -> list[FSDPModule]:
    """Every FSDP2 module of ``net`` (the root and each sharded block or group), in module order."""
    return [m for m in net.modules() if isinstance(m, FSDPModule)]


def keep_gathered(net: nn.Module) -> bool:
    """Keep every unit of ``net`` all-gathered after its forward (``reshard_after_forward=False``) until
    :func:`reshard_all`; False where this torch's FSDP2 cannot change it after ``fully_shard``."""
    modules = fsdp_modules(net)
    if not modules or not hasattr(modules[0], "set_reshard_after_forward"):
        return False
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
    return True


def reshard_all(net: nn.Module) -> None:
    """Free the all-gathered parameters of every FSDP2 unit of ``net`` (see :func:`keep_gathered`)."""
    for m in fsdp_modules(net):
        m.reshard()


def _meta_params(build: Callable[[], nn.Module]) -> nn.Module:
    """Construct with parameters on the meta device and buffers real (they are derived from the config)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build()


def build_sharded(
    build: Callable[[], nn.Module],
    full_state: dict[str, torch.Tensor] | None,
    info: DistInfo,
    *,
    blocks: Callable[[nn.Module], Iterable[nn.Module]],
    dtype: torch.dtype,
    mp_policy: MixedPrecisionPolicy | None,
    trainable: bool,
    gradient_checkpointing: bool = False,
    compile_blocks: bool = False,
    memory_budget: float | None = None,
    compile_mode: str | None = None,
    blocks_per_unit: int = 1,
    unit_starts: Callable[[nn.Module], Iterable[nn.Module]] | None = None,
    fsdp: bool = True,
) -> nn.Module:
    """Build a model skeleton on meta, shard it, allocate local shards and load ``full_state``.

    Args:
        build: constructs the unsharded model (e.g. ``lambda: Cls.from_config(cfg)``).
        full_state: the complete state dict on rank 0 (any dtype/device); ignored on other ranks.
        blocks: returns the modules to shard individually (transformer blocks), in forward order.
        dtype: storage dtype of the parameters (fp32 master weights for trained nets).
        trainable: sets ``requires_grad`` on every parameter.
        compile_blocks: ``torch.compile`` each block (see :func:`compile_modules`), also when grouped.
        memory_budget: the compiled blocks' activation memory budget (see :func:`compile_modules`).
        compile_mode: their ``torch.compile`` mode (None: the default).
        blocks_per_unit: consecutive blocks per FSDP2 unit (``model.fsdp_blocks_per_unit``).
        unit_starts: returns the blocks that must begin a new unit (see :func:`shard`).
        fsdp: shard with FSDP2; False (``model.fsdp`` in a single process) keeps a plain module whose
            root casts its inputs to ``mp_policy``'s compute dtype as FSDP2's root does (see
            :func:`cast_root_inputs`); the weights stay in ``dtype`` and the engine's autocast runs the
            matrix products in the compute dtype.
    """
    model = _meta_params(build)
    nn.Module.to(model, dtype)  # bypass diffusers' override, which warns about fp32-pinned modules
    model.requires_grad_(trainable)
    if gradient_checkpointing and hasattr(model, "enable_gradient_checkpointing"):
        model.enable_gradient_checkpointing()
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    if fsdp:
        shard(
            model,
            blocks(model),
            mp_policy,
            device=info.device,
            blocks_per_unit=blocks_per_unit,
            unit_starts=unit_starts(model) if unit_starts is not None else (),
        )
    elif mp_policy is not None:
        cast_root_inputs(model, mp_policy.param_dtype)
    model.to_empty(device=info.device)
    for name, buf in buffers.items():
        model.get_buffer(name).copy_(buf)
    state = dict(full_state) if info.is_main else {}  # set_model_state_dict consumes its argument
    set_model_state_dict(
        model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    if compile_blocks:
        compile_modules(blocks(model), memory_budget, compile_mode)
    return model


# compiled graphs per code object: block kinds x gradient modes x batch sizes x frozen / trained models
RECOMPILE_LIMIT = 64


def compile_modules(
    modules: Iterable[nn.Module], memory_budget: float | None = None, mode: str | None = None
) -> None:
    """``module.compile()`` in place (state-dict keys unchanged). Modules of one class share compiled graphs
    (parameters are graph inputs, not constants), so the limit of graphs per code object is raised to
    :data:`RECOMPILE_LIMIT`: past torch's default of 8, further variants would silently run eagerly.
    FSDP2's hooks run outside the compiled code (``torch._dynamo.config.skip_fsdp_hooks``).

    ``memory_budget``: each call of a module runs under ``torch._functorch.config.activation_memory_budget``
    set to it, so the graphs compiled for its training passes recompute activations in their backward to
    save at most that fraction of them (``model.activation_memory_budget``). The budget is read when a graph
    is compiled and is not among dynamo's guards, but a module's class is: each module compiled under a
    budget becomes an instance of a subclass of its class for that budget (same name, see
    :func:`_budget_class`), so modules of one class compiled under different budgets (the generator's and
    the fake score's blocks) get graphs of their own. cuDNN's attention is then saved for the backward,
    not recomputed (see :func:`keep_cudnn_attention_saved`)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.cache_size_limit = max(cfg.cache_size_limit, RECOMPILE_LIMIT)
    if hasattr(cfg, "accumulated_cache_size_limit"):
        cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 4 * RECOMPILE_LIMIT)
    if memory_budget is not None:
        keep_cudnn_attention_saved()
    for module in modules:
        module.compile(mode=mode)
        if memory_budget is not None:
            module.__class__ = _budget_class(type(module), memory_budget)
            module._compiled_call_impl = _under_memory_budget(module._compiled_call_impl, memory_budget)


_BUDGET_CLASSES: dict[tuple[type, float], type] = {}


def _budget_class(cls: type, budget: float) -> type:
    """The subclass of ``cls`` (named like it, no method overridden) whose instances are compiled under
    ``budget``: dynamo guards on a module's class, so each budget gets its own graphs.

    For an FSDP2 class (``FSDP<Block>``), whose ``__new__`` builds the unsharded class found at a fixed
    place in its MRO (e.g. when a container is indexed), ``__new__`` is delegated to ``cls`` so that the
    extra class in the MRO does not shift it."""
    cls = getattr(cls, "_budget_base", cls)
    key = (cls, float(budget))
    if key not in _BUDGET_CLASSES:
        attrs = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "_budget_base": cls}
        attrs["memory_budget"] = float(budget)
        if issubclass(cls, FSDPModule):
            attrs["__new__"] = lambda _, *args, **kwargs: cls.__new__(cls, *args, **kwargs)
        _BUDGET_CLASSES[key] = type(cls.__name__, (cls,), attrs)
    return _BUDGET_CLASSES[key]


def keep_cudnn_attention_saved() -> None:
    """Make torch's partitioner treat cuDNN's fused attention as compute-intensive, as it treats the flash
    and memory-efficient attention kernels (its list misses cuDNN's, which torch picks on H100/H200).

    Under an activation memory budget the partitioner recomputes freely whatever is not on that list, so
    every block's backward ran its attention forward again (the SD3.5 Medium transformer at 1024 px: 74
    cuDNN forward calls per training pass instead of 37, 10.4 ms of 127 ms of GPU time on an H200) to save
    the attention's output (13.6 MB per layer). Listed, the attention is saved unless the budget cannot be
    met otherwise. Idempotent; a no-op where torch lacks the op or the list."""
    from torch._functorch import partitioners

    original = partitioners.get_default_op_list
    op = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)
    if op is None or getattr(original, "keeps_cudnn_attention", False):
        return

    def get_default_op_list():
        op_types = original()
        ops = getattr(op_types, "compute_intensive_ops", None)
        if ops is not None and hasattr(ops, "add"):
            ops.add(op)
        return op_types

    get_default_op_list.keeps_cudnn_attention = True
    partitioners.get_default_op_list = get_default_op_list


def _under_memory_budget(fn: Callable, budget: float) -> Callable:
    import torch._functorch.config

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with torch._functorch.config.patch(activation_memory_budget=budget):
            return fn(*args, **kwargs)

    return call


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gather the unsharded state dict on CPU; the dict is complete on rank 0 and empty elsewhere."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def read_diffusers_weights(folder: Path, prefix: str = "diffusion_pytorch_model") -> dict[str, torch.Tensor]:
    """Read a diffusers model folder's weights as stored (single or sharded safetensors, or ``.bin``)."""
    from safetensors.torch import load_file

    single = folder / f"{prefix}.safetensors"
    index = folder / f"{prefix}.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for name in shards:
            state.update(load_file(str(folder / name)))
        return state
    binary = folder / f"{prefix}.bin"
    if binary.is_file():
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder} holds no {prefix}.safetensors, sharded safetensors or .bin weights")
