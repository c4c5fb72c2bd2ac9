"""What differs between the model families for code that takes either: SAM (``segment_anything``'s ``Sam``) and
SAM 2 (``sam2``'s ``SAM2Base``, the optional extra).

Quantization, ONNX export and the CPU runtimes work on a model's two graphs, the image encoder and the prompt
decoder, and need to know per family:

- which PyTorch back-end runs it (`TorchSamBackend` or `TorchSam2Backend`) and so which two graphs it has
  (`Family.networks`, the modules those back-ends run and the ones exported to ONNX), and which runner
  (`SamRunner` or `Sam2Runner`) turns image-space prompts into masks with any back-end of the family;
- the encoder graph's outputs, which the decoder graph takes first, then ``point_coords``, ``point_labels``:
  SAM's one ``image_embeddings`` (1x256x64x64), SAM 2's three levels ``high_res_feats_0`` (1x32x256x256),
  ``high_res_feats_1`` (1x64x128x128) and ``image_embed`` (1x256x64x64);
- the names of its prompt encoder and mask decoder (``prompt_encoder``, ``mask_decoder`` or SAM 2's
  ``sam_prompt_encoder``, ``sam_mask_decoder``), and so the module-name prefix of each part;
- the image preprocessing and the prompt frame (`Family.prepare`: SAM resizes the longest side and pads, SAM 2
  resizes to a square).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from student_models.preprocessing import prepare_image
from student_models.registry import IMAGE_SIZE, get_spec
from student_models.sam2_pipeline import Sam2Features, Sam2Runner, Sam2Transforms, TorchSam2Backend
from student_models.sam_runner import SamRunner, TorchSamBackend

PROMPT_NAMES = ("point_coords", "point_labels")
DECODER_OUTPUTS = ("low_res_masks", "iou_predictions")

# An image in the model's input frame, and the map from its pixel (x, y) coordinates (...x2) to that frame.
Prepared = tuple[torch.Tensor, Callable[[np.ndarray], np.ndarray]]


@dataclass(frozen=True)
class Family:
    """One model family's back-end, graph contract and module layout (see the module docstring)."""

    name: str
    backend: type[TorchSamBackend]
    runner: type[SamRunner]
    embedding_names: tuple[str, ...]
    prompt_encoder: str
    mask_decoder: str

    @property
    def part_prefixes(self) -> dict[str, str]:
        """{"encoder" | "decoder": the module-name prefix of the image encoder's / the mask decoder's layers}."""
        return {"encoder": "image_encoder.", "decoder": f"{self.mask_decoder}."}

    def heads(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """`model`'s (prompt encoder, mask decoder)."""
        return getattr(model, self.prompt_encoder), getattr(model, self.mask_decoder)

    def networks(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(encoder graph, decoder graph) of `model`: images -> embedding levels; levels, coords, labels ->
        (Bx4x256x256 logits, Bx4 IoU)."""
        return self.backend.graphs(model)

    @property
    def decoder_inputs(self) -> tuple[str, ...]:
        return (*self.embedding_names, *PROMPT_NAMES)

    def embedding(self, levels: Sequence[torch.Tensor]) -> torch.Tensor | Sam2Features:
        """The encoder graph's outputs as the back-end's embedding (SAM: the tensor; SAM 2: `Sam2Features`)."""
        if len(levels) != len(self.embedding_names):
            raise ValueError(f"{self.name} has {len(self.embedding_names)} embedding levels, got {len(levels)}")
        return Sam2Features.from_levels(levels) if self.name == "sam2" else levels[0]

    def prepare(self, image: np.ndarray) -> Prepared:
        """An HxWx3 uint8 image as the 1x3x1024x1024 input its encoder takes, and its pixels' map to that frame."""
        hw = tuple(image.shape[:2])
        if self.name == "sam2":
            transforms = Sam2Transforms(IMAGE_SIZE)
            return transforms.images([image]), lambda coords: transforms.points(torch.from_numpy(coords), hw).numpy()
        resize = ResizeLongestSide(IMAGE_SIZE)
        return prepare_image(image).tensor, lambda coords: resize.apply_coords(coords, hw)


def graph_levels(output: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """An encoder graph's output (SAM's tensor, SAM 2's tuple of levels) as the tuple the decoder graph takes first."""
    return output if isinstance(output, tuple) else (output,)


def embedding_levels(embedding: torch.Tensor | Sam2Features) -> tuple[torch.Tensor, ...]:
    """A back-end's embedding as its encoder graph's outputs, in the family's `Family.embedding_names` order."""
    return embedding.levels if isinstance(embedding, Sam2Features) else (embedding,)


FAMILIES = {
    "sam": Family(
        "sam",
        TorchSamBackend,
        SamRunner,
        ("image_embeddings",),
        "prompt_encoder",
        "mask_decoder",
    ),
    "sam2": Family(
        "sam2",
        TorchSam2Backend,
        Sam2Runner,
        ("high_res_feats_0", "high_res_feats_1", "image_embed"),
        "sam_prompt_encoder",
        "sam_mask_decoder",
    ),
}


def family_named(model_name: str) -> Family:
    """The `Family` of the registered model `model_name`."""
    return FAMILIES[get_spec(model_name).family]


def family_of(model: nn.Module) -> Family:
    """The `Family` of a built model (a ``Sam`` or a ``SAM2Base``, float or quantized)."""
    if isinstance(model, Sam):
        return FAMILIES["sam"]
    if type(model).__module__.startswith("sam2."):
        from sam2.modeling.sam2_base import SAM2Base  # the extra is installed: the model came from it

        if isinstance(model, SAM2Base):
            return FAMILIES["sam2"]
    raise TypeError(f"not a SAM or SAM 2 model: {type(model).__name__} (build one with student_models.build_sam)")


def family_of_graph(embedding_names: list[str]) -> Family:
    """The `Family` whose encoder graph has the outputs `embedding_names` (an exported encoder file's)."""
    for family in FAMILIES.values():
        if tuple(embedding_names) == family.embedding_names:
            return family
    known = "; ".join(f"{f.name}: {', '.join(f.embedding_names)}" for f in FAMILIES.values())
    raise ValueError(f"an encoder graph with outputs {list(embedding_names)} is no model family's ({known})")
