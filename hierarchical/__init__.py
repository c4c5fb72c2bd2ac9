"""TinySAM-style fast segment-everything: `HierarchicalMaskGenerator(sam).generate(image)`."""

from hierarchical.agreement import Agreement, agreement_with_sam
from hierarchical.compare import compare_generators, comparison_table, summarize_comparison
from hierarchical.config import ConfigError, GeneratorConfig
from hierarchical.generator import GenerationTiming, HierarchicalMaskGenerator
from hierarchical.runner import RunSummary, collect_images, segment_files

__all__ = [
    "Agreement",
    "ConfigError",
    "GenerationTiming",
    "GeneratorConfig",
    "HierarchicalMaskGenerator",
    "RunSummary",
    "agreement_with_sam",
    "collect_images",
    "compare_generators",
    "comparison_table",
    "segment_files",
    "summarize_comparison",
]
