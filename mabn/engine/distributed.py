"""Process-group set-up and the few collectives the trainer needs.

Works under ``torchrun`` (env:// rendezvous: RANK, WORLD_SIZE, LOCAL_RANK; nccl on CUDA, gloo on
CPU), under SLURM with one task per GPU (its variables are mapped to torchrun's; used by the
hydra-submitit-launcher config configs/hydra/launcher/slurm.yaml; not exercised here, no cluster),
and as a plain single process (no process group at all).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "setup", "slurm_env", "cleanup", "all_reduce_sum", "all_gather_objects", "barrier"]


@dataclass
class DistInfo:
    """Where this process stands."""

    rank: int = 0
    """Global rank."""
    local_rank: int = 0
    """Rank on this machine (selects the GPU)."""
    world_size: int = 1
    """Number of processes."""
    device: torch.device = torch.device("cpu")
    """Device this process computes on."""

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes TensorBoard events and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def slurm_env(environ) -> dict[str, str]:
    """torchrun-style variables for a process started by SLURM (srun / hydra-submitit-launcher with
    one task per GPU) and not by torchrun; empty when torchrun's variables are set or when SLURM
    runs a single task. MASTER_ADDR: localhost on one node, else the launch node's address."""
    if "RANK" in environ or int(environ.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in environ:
        return {}
    one_node = int(environ.get("SLURM_NNODES", "1")) == 1
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_NTASKS"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or ("127.0.0.1" if one_node else environ["SLURM_LAUNCH_NODE_IPADDR"]),
        "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000),
    }


def setup(device: str = "auto") -> DistInfo:
    """Resolve the device and join the process group when launched by torchrun (or by SLURM with
    one task per GPU, see :func:`slurm_env`) with more than one process."""
    os.environ.update(slurm_env(os.environ))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but CUDA is not available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, init_method="env://", **kwargs)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum a small float64 vector over ranks (identity in a single process). Returns it on CPU."""
    t = torch.as_tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (a picklable object), in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
