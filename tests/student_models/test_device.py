import argparse

import pytest
import torch

from student_models.device import add_device_argument, default_device, parse_device
from tests.helpers import requires_cuda


def test_auto_is_cuda_when_present_else_cpu():
    assert parse_device(None) == parse_device("auto") == default_device()
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_cpu_and_bad_names():
    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="not one of auto, cpu, cuda"):
        parse_device("gpu0")
    with pytest.raises(ValueError, match="only auto, cpu, cuda"):
        parse_device("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_gpu_names_the_fix():
    with pytest.raises(ValueError, match="--device cpu"):
        parse_device("cuda")


@requires_cuda
def test_cuda_ordinal_checked_against_device_count():
    assert parse_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="GPU\\(s\\)"):
        parse_device(f"cuda:{torch.cuda.device_count()}")


def test_argparse_gives_one_error_line(capsys):
    parser = argparse.ArgumentParser(prog="x")
    add_device_argument(parser)
    assert parser.parse_args([]).device == default_device()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--device", "gpu0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("x: error: argument --device:")
