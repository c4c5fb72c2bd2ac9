"""TinySAM-style fast segment-everything: `HierarchicalMaskGenerator(sam).generate(image)`."""

from hierarchical.agreement import agreement_with_sam
from hierarchical.compare import compare_generators
from hierarchical.config import ConfigError, GeneratorConfig
from hierarchical.generator import HierarchicalMaskGenerator
from hierarchical.runner import segment_files

__all__ = [
    "ConfigError",
    "GeneratorConfig",
    "HierarchicalMaskGenerator",
    "agreement_with_sam",
    "compare_generators",
    "segment_files",
]
