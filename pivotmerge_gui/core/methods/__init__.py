"""Merge methods, one module each, registered with metadata (see :mod:`.base`)."""

from .base import (
    REGISTRY,
    Calibration,
    MergeJob,
    MergeMethod,
    MergeOutput,
    Param,
    TensorMergeMethod,
    get_method,
    list_methods,
    register,
)

__all__ = [
    "REGISTRY",
    "Calibration",
    "MergeJob",
    "MergeMethod",
    "MergeOutput",
    "Param",
    "TensorMergeMethod",
    "get_method",
    "list_methods",
    "register",
]
