"""The ``--device`` every command takes: parsed and checked once, so a bad value is one clear line, not a CUDA trace."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch


def default_device() -> torch.device:
    """CUDA (the current device) when PyTorch sees a GPU, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def parse_device(text: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> `default_device()`; "cpu", "cuda" and "cuda:N" checked against the GPUs this process sees.

    Raises ValueError naming what is wrong and the values that would work.
    """
    if text is None or text == "auto":
        return default_device()
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {text!r} is not one of auto, cpu, cuda, cuda:N ({exc})") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"device {text!r}: only auto, cpu, cuda and cuda:N are supported")
    if not torch.cuda.is_available():
        raise ValueError(f"device {text!r}: PyTorch sees no CUDA GPU here; use --device cpu")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= count:
        raise ValueError(f"device {text!r}: this process sees {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def _argparse_device(text: str) -> torch.device:
    try:
        return parse_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_device_argument(parser: argparse.ArgumentParser, **kwargs) -> None:
    """Add ``--device`` (default auto: CUDA when present, else CPU); ``args.device`` is a checked torch.device."""
    parser.add_argument(
        "--device",
        type=_argparse_device,
        default=kwargs.pop("default", "auto"),
        help=kwargs.pop("help", "auto (CUDA when PyTorch sees a GPU, else CPU), cpu, cuda or cuda:N (default auto)"),
        **kwargs,
    )


@contextlib.contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """PyTorch's intra-op CPU threads set to `num_threads` inside the block, then put back."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
