"""The model zoo: SAM teachers, compact students and tiny test variants, built by name."""

from student_models.build import build_sam, load_sam
from student_models.checkpoints import (
    KNOWN_CHECKPOINTS,
    CheckpointError,
    atomic_torch_save,
    load_model_weights,
    load_torch_file,
    read_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from student_models.registry import (
    EMBED_DIM,
    EMBED_SIDE,
    IMAGE_SIZE,
    ModelSpec,
    assemble_sam,
    canonical_name,
    get_spec,
    list_models,
    register_model,
)

__all__ = [
    "EMBED_DIM",
    "EMBED_SIDE",
    "IMAGE_SIZE",
    "KNOWN_CHECKPOINTS",
    "CheckpointError",
    "ModelSpec",
    "assemble_sam",
    "atomic_torch_save",
    "build_sam",
    "canonical_name",
    "get_spec",
    "list_models",
    "load_model_weights",
    "load_sam",
    "load_torch_file",
    "read_checkpoint",
    "register_model",
    "resolve_checkpoint",
    "save_checkpoint",
]
