"""Process-group set-up and the few collectives the trainer needs.

Works under ``torchrun`` (env:// rendezvous: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT; nccl on CUDA, gloo on CPU), under the hydra-submitit-launcher with one task per GPU
(configs/hydra/launcher/slurm.yaml: the same variables are taken from submitit's
``JobEnvironment``, see :func:`submitit_env`; submitit itself is optional), under a plain ``srun``
with one task per GPU (SLURM's variables, :func:`slurm_env`), and as a plain single process (no
process group at all).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "device_type", "setup", "launcher_env", "submitit_env", "slurm_env", "cleanup", "all_reduce_sum",
           "all_gather_objects", "barrier"]


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


def _port_for(job_id: str) -> str:
    """A rendezvous port that every task of one job derives alike (and other jobs rarely share)."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return str(20000 + int(digits) % 20000)


def submitit_env(environ) -> dict[str, str]:
    """torchrun-style variables of a task started by submitit (the hydra-submitit-launcher), from
    ``submitit.JobEnvironment()``: RANK = global_rank, WORLD_SIZE = num_tasks, LOCAL_RANK =
    local_rank, MASTER_ADDR = the job's first node (hostnames[0]), MASTER_PORT derived from the job
    id; MASTER_ADDR/MASTER_PORT already in ``environ`` are kept. Empty when torchrun's variables
    are set, outside a submitit job (no ``SUBMITIT_EXECUTOR``), when submitit is not installed, or
    for a single task."""
    if "RANK" in environ or not environ.get("SUBMITIT_EXECUTOR"):
        return {}
    try:
        import submitit
    except ImportError:
        return {}
    job = submitit.JobEnvironment()
    if job.num_tasks <= 1:
        return {}
    return {
        "RANK": str(job.global_rank),
        "WORLD_SIZE": str(job.num_tasks),
        "LOCAL_RANK": str(job.local_rank),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or str(job.hostnames[0]),
        "MASTER_PORT": environ.get("MASTER_PORT") or _port_for(job.job_id),
    }


def slurm_env(environ) -> dict[str, str]:
    """torchrun-style variables of a task started by a plain ``srun`` with one task per GPU (not by
    torchrun or submitit); empty when torchrun's variables are set or when SLURM runs a single
    task. MASTER_ADDR is 127.0.0.1 on one node; across nodes it must be given (e.g.
    ``MASTER_ADDR=$(scontrol show hostnames | head -n 1)``), or use the submitit launcher."""
    if "RANK" in environ or int(environ.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in environ:
        return {}
    if int(environ.get("SLURM_NNODES", "1")) > 1 and not environ.get("MASTER_ADDR"):
        raise RuntimeError("srun with tasks on several nodes: set MASTER_ADDR to the first node's address "
                           "(or launch through torchrun or the submitit launcher)")
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_NTASKS"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or "127.0.0.1",
        "MASTER_PORT": environ.get("MASTER_PORT") or _port_for(environ.get("SLURM_JOB_ID", "0")),
    }


def launcher_env(environ) -> dict[str, str]:
    """The torchrun-style variables this process lacks: from submitit's JobEnvironment under the
    submitit launcher, else from SLURM's variables under srun, else none."""
    return submitit_env(environ) or slurm_env(environ)


def device_type(device: str) -> str:
    """The device type a config's ``device`` ("auto", "cpu", "cuda") runs on here: "auto" is
    "cuda" when a GPU is available."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def setup(device: str = "auto") -> DistInfo:
    """Resolve the device and join the process group when launched by torchrun (or by submitit /
    srun with one task per GPU, see :func:`launcher_env`) with more than one process."""
    os.environ.update(launcher_env(os.environ))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = device_type(device)
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
