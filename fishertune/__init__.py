"""fishertune-bench: reproduce FisherTune (CVPR 2025) and Rein (CVPR 2024) tables.

The package holds what every method shares (backbones, data, heads, engine, runner, report) and the
FisherTune method itself; the compared methods live in the sibling package ``baselines``.
"""

__version__ = "0.1.0"
