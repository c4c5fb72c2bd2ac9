"""Published figures the report draws beside ours (SPEC section 5, from the TinySAM paper).

COCO val2017 zero-shot instance segmentation AP with ViTDet-H boxes, and image-encoder latency
with TensorRT on an NVIDIA T4. Another protocol and other hardware than our measurements:
the report marks them as published and never mixes them into our table.
"""

from __future__ import annotations

from dataclasses import dataclass

PUBLISHED_SOURCE = "TinySAM paper (Shu et al., AAAI 2025): COCO AP with ViTDet-H boxes, T4 TensorRT latency"


@dataclass(frozen=True)
class PublishedPoint:
    name: str
    ap: float
    latency_ms: float
    gmacs: float


PUBLISHED_POINTS = (
    PublishedPoint("SAM-H", 46.6, 2392.0, 2976.0),
    PublishedPoint("SAM-B", 43.4, 369.0, 487.0),
    PublishedPoint("MobileSAM", 41.0, 38.4, 42.0),
    PublishedPoint("EfficientSAM-Ti", 42.3, 81.0, 106.0),
    PublishedPoint("TinySAM", 42.3, 38.4, 42.0),
    PublishedPoint("Q-TinySAM", 41.4, 24.0, 20.3),
)
