"""Launcher environments map to torchrun's variables: submitit's JobEnvironment (the
hydra-submitit-launcher of configs/hydra/launcher/slurm.yaml) and a plain srun. No cluster here:
submitit is replaced by a fake module holding a JobEnvironment with known values."""

import sys
import types

import pytest

from mabn.engine import distributed
from mabn.engine.distributed import launcher_env, slurm_env, submitit_env


class FakeJobEnvironment:
    """What submitit.JobEnvironment() returns inside task 11 of a 2-node x 8-task job."""

    global_rank = 11
    local_rank = 3
    num_tasks = 16
    num_nodes = 2
    node = 1
    hostnames = ["gpu-node-07", "gpu-node-08"]
    job_id = "4242_3"  # an array job (one Hydra multirun job) and its task


@pytest.fixture
def fake_submitit(monkeypatch):
    module = types.ModuleType("submitit")
    module.JobEnvironment = FakeJobEnvironment
    monkeypatch.setitem(sys.modules, "submitit", module)
    return module


def test_submitit_job_environment_maps_to_torchrun_variables(fake_submitit):
    env = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_PROCID": "11", "SLURM_NTASKS": "16", "SLURM_NNODES": "2"}
    expected = {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "MASTER_ADDR": "gpu-node-07",
                "MASTER_PORT": str(20000 + 42423 % 20000)}
    assert submitit_env(env) == expected
    assert launcher_env(env) == expected  # submitit first, not SLURM's variables
    # Every task of the job derives the same rendezvous.
    FakeJobEnvironment.global_rank, FakeJobEnvironment.local_rank = 0, 0
    try:
        other = submitit_env(env)
    finally:
        FakeJobEnvironment.global_rank, FakeJobEnvironment.local_rank = 11, 3
    assert (other["RANK"], other["MASTER_ADDR"], other["MASTER_PORT"]) == ("0", "gpu-node-07", expected["MASTER_PORT"])
    # Given addresses are kept; torchrun's variables win; single task and non-submitit: nothing.
    assert submitit_env(dict(env, MASTER_ADDR="10.0.0.1", MASTER_PORT="29500"))["MASTER_ADDR"] == "10.0.0.1"
    assert submitit_env(dict(env, RANK="0")) == {}
    assert submitit_env({k: v for k, v in env.items() if k != "SUBMITIT_EXECUTOR"}) == {}
    FakeJobEnvironment.num_tasks = 1
    try:
        assert submitit_env(env) == {}
    finally:
        FakeJobEnvironment.num_tasks = 16


def test_setup_uses_the_submitit_mapping(fake_submitit, monkeypatch):
    """setup() puts the mapping into os.environ before reading it (a 1-task job: no process group)."""
    FakeJobEnvironment.num_tasks = 1
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    try:
        info = distributed.setup("cpu")
    finally:
        FakeJobEnvironment.num_tasks = 16
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)


def test_without_submitit_installed_srun_variables_are_used(monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit -> ImportError
    env = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "5",
           "SLURM_NNODES": "1", "SLURM_JOB_ID": "123"}
    assert launcher_env(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "5", "MASTER_ADDR": "127.0.0.1",
                                 "MASTER_PORT": "20123"}


def test_srun_variables():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "5", "SLURM_NNODES": "1", "SLURM_JOB_ID": "123"}
    assert slurm_env(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "5", "MASTER_ADDR": "127.0.0.1",
                              "MASTER_PORT": "20123"}
    assert slurm_env(dict(env, RANK="0")) == {}  # torchrun already set it up
    assert slurm_env(dict(env, SLURM_NTASKS="1")) == {}  # a single task: plain process
    # Several nodes: no guessing of the master's address.
    with pytest.raises(RuntimeError, match="set MASTER_ADDR"):
        slurm_env(dict(env, SLURM_NNODES="2", SLURM_LAUNCH_NODE_IPADDR="10.1.2.3"))
    assert slurm_env(dict(env, SLURM_NNODES="2", MASTER_ADDR="node-1"))["MASTER_ADDR"] == "node-1"
