"""Our vit_b against the official segment-anything builder on the same random weights."""

from __future__ import annotations

import torch
from segment_anything import build_sam_vit_b

from student_models import build_sam

TOLERANCE = 1e-4  # max abs difference on the embedding and the decoder outputs


def test_vit_b_matches_official_segment_anything():
    torch.manual_seed(0)
    official = build_sam_vit_b().eval()
    ours = build_sam("vit_b")
    ours.load_state_dict(official.state_dict(), strict=True)
    image = torch.randn(1, 3, 1024, 1024)
    coords = torch.tensor([[[300.0, 400.0], [700.0, 200.0]]])
    labels = torch.tensor([[1, 0]])
    boxes = torch.tensor([[100.0, 150.0, 600.0, 800.0]])
    outputs = []
    with torch.no_grad():
        for sam in (official, ours):
            embedding = sam.image_encoder(image)
            sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=boxes, masks=None)
            masks, iou = sam.mask_decoder(
                image_embeddings=embedding,
                image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=True,
            )
            outputs.append((embedding, masks, iou))
    for theirs, mine in zip(*outputs, strict=True):
        assert (theirs - mine).abs().max().item() <= TOLERANCE
