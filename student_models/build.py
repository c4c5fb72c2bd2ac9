"""Build a registered model by name, with random weights or from a checkpoint.

The top of the package's one-way chain: `registry` (names and architectures) <- `checkpoints`
(files: find, verify, read, save) <- `build` (a model with its weights).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from segment_anything.modeling import Sam

from student_models.checkpoints import (
    CheckpointError,
    guess_model,
    load_model_weights,
    load_state_dict_strict,
    read_checkpoint,
)
from student_models.registry import build_architecture, get_spec, list_models

if TYPE_CHECKING:
    from sam2.modeling.sam2_base import SAM2Base


def build_sam(name: str, checkpoint: str | os.PathLike | None = None) -> Sam | SAM2Base:
    """Build a registered model in eval mode, with random weights or from a checkpoint.

    A SAM model is a `segment_anything.modeling.Sam`; a SAM 2 model (``list_models(family="sam2")``, the
    ``sam2`` extra) is a ``sam2.modeling.sam2_base.SAM2Base``.

    Args:
        name: a name from `list_models()` (or an alias such as ``vit_t``).
        checkpoint: a file path, or the name of a known official checkpoint (see
            `student_models.checkpoints.KNOWN_CHECKPOINTS`), fetched into the cache when the
            network allows and verified by its published size and SHA-256. Loading is strict:
            every key and shape must match.
    """
    spec = get_spec(name)
    sam = build_architecture(spec.name)
    if checkpoint is not None:
        load_model_weights(sam, spec.name, checkpoint)
    return sam.eval()


def load_sam(checkpoint: str | os.PathLike) -> Sam | SAM2Base:
    """Build and load a model from a checkpoint alone: by the name it carries, else by its keys."""
    state_dict, header = read_checkpoint(checkpoint)
    name = header.get("model_name") or guess_model(state_dict)
    if name is None:
        raise CheckpointError(
            f"{checkpoint} names no model and matches no registered one ({', '.join(list_models())}); "
            f"build it by name with build_sam(name, checkpoint=...) to see which keys differ."
        )
    sam = build_sam(name)
    load_state_dict_strict(sam, state_dict, str(checkpoint))
    return sam.eval()
