"""Full-stage knowledge distillation of a SAM student from a frozen SAM teacher (TinySAM, SPEC section 2).

from distill import DistillConfig, distill
result = distill(DistillConfig(teacher="vit_h", teacher_checkpoint="sam_vit_h_4b8939", data="path/to/sa1b"))
sam = student_models.build_sam("tinyvit_5m", checkpoint=result.checkpoint)
"""

from distill.cache import CacheError, EmbeddingCache, fill_cache
from distill.config import DistillConfig
from distill.model import DistillError
from distill.train import DistillResult, distill

__all__ = ["CacheError", "DistillConfig", "DistillError", "DistillResult", "EmbeddingCache", "distill", "fill_cache"]
