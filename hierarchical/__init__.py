"""TinySAM-style fast segment-everything: `HierarchicalMaskGenerator(sam).generate(image)`."""

from hierarchical.config import ConfigError, GeneratorConfig
from hierarchical.generator import GenerationTiming, HierarchicalMaskGenerator

__all__ = [
    "ConfigError",
    "GenerationTiming",
    "GeneratorConfig",
    "HierarchicalMaskGenerator",
]
