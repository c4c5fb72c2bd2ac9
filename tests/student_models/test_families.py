"""Which family a model or an exported encoder belongs to, and what each family's contract says."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from student_models.families import FAMILIES, family_named, family_of, family_of_graph
from student_models.sam2_pipeline import Sam2Features
from tests.helpers import tiny_model
from tests.student_models.test_sam2_models import requires_sam2


def test_a_sam_model_and_its_graphs():
    sam = tiny_model("tinyvit_test")
    family = family_of(sam)
    assert family is FAMILIES["sam"] is family_named("tinyvit_test")
    encoder, _ = family.networks(sam)
    assert encoder is sam.image_encoder
    assert family.heads(sam) == (sam.prompt_encoder, sam.mask_decoder)
    assert family.decoder_inputs == ("image_embeddings", "point_coords", "point_labels")


@requires_sam2
def test_a_sam2_model_and_its_three_levels():
    model = tiny_model("sam2_test_student")
    family = family_of(model)
    assert family is FAMILIES["sam2"] is family_named("sam2_test_student")
    assert family.part_prefixes == {"encoder": "image_encoder.", "decoder": "sam_mask_decoder."}
    levels = Sam2Features.random(1).levels
    embedding = family.embedding(levels)
    assert isinstance(embedding, Sam2Features) and embedding.levels == levels
    with pytest.raises(ValueError, match="sam2 has 3 embedding levels, got 1"):
        family.embedding(levels[:1])


def test_an_exported_encoders_outputs_name_its_family():
    assert family_of_graph(["image_embeddings"]) is FAMILIES["sam"]
    assert family_of_graph(["high_res_feats_0", "high_res_feats_1", "image_embed"]) is FAMILIES["sam2"]
    with pytest.raises(ValueError, match=r"outputs \['features'\] is no model family's"):
        family_of_graph(["features"])


def test_other_modules_are_refused_with_the_builder_named():
    with pytest.raises(TypeError, match="not a SAM or SAM 2 model: Linear .*student_models.build_sam"):
        family_of(nn.Linear(2, 2))
    assert torch.equal(FAMILIES["sam"].embedding([torch.ones(1)]), torch.ones(1))
