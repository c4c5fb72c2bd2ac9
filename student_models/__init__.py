"""The model zoo: SAM teachers, compact students and tiny test variants, built by name."""

from student_models.build import build_sam, load_sam
from student_models.checkpoints import CheckpointError
from student_models.extras import MissingExtraError
from student_models.registry import ModelSpec, get_spec, list_models, register_model
from student_models.sam_runner import SamRunner, TorchSamBackend

__all__ = [
    "CheckpointError",
    "MissingExtraError",
    "ModelSpec",
    "SamRunner",
    "TorchSamBackend",
    "build_sam",
    "get_spec",
    "list_models",
    "load_sam",
    "register_model",
]
