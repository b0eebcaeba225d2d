"""PivotMerge Studio: merge the cross-modal projectors of multimodal LLMs."""

__version__ = "0.1.0"
