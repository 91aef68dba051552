"""The device mesh fxspec's distributed helpers run on, and the checks made before one is used.

``mesh_for(2)`` builds a 1-D mesh over the default process group (``torch.distributed`` must be initialised,
e.g. by ``torchrun --nproc-per-node 2`` and ``torch.distributed.init_process_group``, and the world must have
exactly 2 processes); a :class:`~torch.distributed.device_mesh.DeviceMesh` passed in is checked (1-D) and used
as it is. The mesh's device type follows the process group's backend: ``cuda`` where the group talks NCCL,
``cpu`` for ``gloo``. ``init_device_mesh`` sets each process's CUDA device from ``LOCAL_RANK`` (torchrun)
when the script has not chosen one.
"""

from __future__ import annotations

import numbers

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def check_size(n: object, what: str) -> int:
    """``n`` as an int >= 1, or a ``TypeError`` / ``ValueError`` naming ``what``."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{what} must be an int >= 1 (the number of processes to shard over) or None "
                        f"(got {type(n).__name__} {n!r})")
    if n < 1:
        raise ValueError(f"{what} must be >= 1 (got {n})")
    return int(n)


def mesh_for(mesh_or_size: DeviceMesh | int, what: str = "tp") -> DeviceMesh:
    """A 1-D mesh: ``mesh_or_size`` itself (checked), or a new one over all processes of the default group."""
    if isinstance(mesh_or_size, DeviceMesh):
        if mesh_or_size.ndim != 1:
            raise ValueError(f"{what}: a {mesh_or_size.ndim}-D device mesh was given; pass its 1-D sub-mesh "
                             f"for this dimension (mesh['{what}'] of a named mesh)")
        return mesh_or_size
    size = check_size(mesh_or_size, what)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{what}={size} needs torch.distributed initialised: launch one process per GPU with "
            f"`torchrun --nproc-per-node {size} your_script.py` and call "
            f"torch.distributed.init_process_group('nccl') (or 'gloo' on CPUs) before sharding")
    world = dist.get_world_size()
    if world != size:
        raise ValueError(f"{what}={size} but the job has {world} processes: {what} must equal the world size "
                         f"(torchrun --nproc-per-node {size}); to shard over part of a larger job, pass a 1-D "
                         f"DeviceMesh instead of a number")
    return init_device_mesh(device_type_of_group(), (size,), mesh_dim_names=(what,))


def device_type_of_group() -> str:
    """``"cuda"`` when the default process group talks NCCL and CUDA is available, else ``"cpu"``."""
    backend = str(dist.get_backend()).lower()
    return "cuda" if "nccl" in backend and torch.cuda.is_available() else "cpu"


def mesh_device(mesh: DeviceMesh) -> torch.device:
    """The device of this process's shard on ``mesh``."""
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    handle = getattr(torch, mesh.device_type)
    return torch.device(mesh.device_type, handle.current_device())
