"""distill.runtime: which device each process takes (alone and under torchrun), and what it refuses."""

from __future__ import annotations

import pytest
import torch

from distill import DistillError
from distill.__main__ import get_parser, main
from distill.runtime import choose_device, setup_runtime


@pytest.fixture
def one_gpu(monkeypatch):
    """Pretend PyTorch sees one CUDA GPU: choose_device only asks torch.cuda how many there are."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_one_process_takes_what_it_is_given(one_gpu):
    assert choose_device("auto") == torch.device("cuda", 0)
    assert choose_device("cuda") == choose_device("cuda:0") == torch.device("cuda", 0)
    assert choose_device("cpu") == torch.device("cpu")
    with pytest.raises(DistillError, match=r"sees 1 GPU\(s\), cuda:0 to cuda:0"):
        choose_device("cuda:1")


def test_torchrun_gives_each_process_its_own_gpu_and_refuses_more_processes_than_gpus(one_gpu):
    assert choose_device("cuda", local_rank=0, local_processes=1) == torch.device("cuda", 0)
    for requested in ("auto", "cuda"):
        with pytest.raises(DistillError) as error:
            choose_device(requested, local_rank=1, local_processes=2)
        message = str(error.value)
        assert "torchrun started 2 processes on this node (--nproc_per_node 2) but PyTorch sees 1 GPU(s)" in message
        assert "--nproc_per_node 1" in message and "--device cpu (gloo)" in message
    with pytest.raises(DistillError, match="puts all 2 processes of this node on one GPU; give --device cuda"):
        choose_device("cuda:0", local_rank=0, local_processes=2)
    assert choose_device("cpu", local_rank=1, local_processes=2) == torch.device("cpu")  # gloo on the CPU


def test_torchrun_environment_with_device_cpu_starts_gloo(monkeypatch, free_port):
    """One torchrun process on the CPU: a gloo process group even for one, so DDP runs as it would on eight."""
    env = {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    runtime = setup_runtime("cpu")
    try:
        assert (runtime.device, runtime.backend, runtime.distributed) == (torch.device("cpu"), "gloo", True)
        assert torch.distributed.get_backend() == "gloo"
    finally:
        torch.distributed.destroy_process_group()
    for name in env:
        monkeypatch.delenv(name)
    assert setup_runtime("cpu").backend is None  # no torchrun: no process group


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_device_cuda_without_a_gpu_is_one_error_line(tmp_path, capsys):
    assert main(["--device", "cuda", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: device 'cuda': PyTorch sees no CUDA GPU here; use --device cpu"), err
    assert not (tmp_path / "teacher_cache").exists()


def test_help_shows_device_and_what_it_means_under_torchrun():
    text = " ".join(get_parser().format_help().split())
    assert "--device DEVICE auto (CUDA when PyTorch sees a GPU, else CPU), cpu, cuda or cuda:N" in text
    assert "under torchrun, auto and cuda give process r cuda:r" in text


def test_misspelt_device_is_refused_by_the_config(tmp_path, capsys):
    assert main(["--device", "gpu", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err == "error: device must be auto, cpu, cuda or cuda:N; got 'gpu'\n"
