"""Names the recipe, the CLI and the app offer for dtypes and output formats.

One home for these lists (torch-free, so the GUI can build its forms before torch is
imported); :mod:`pivotmerge_gui.core.devices` maps the dtype names to torch dtypes."""

from __future__ import annotations

# compute / output dtypes, by the names recipes use
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16", "float64")
# output dtype: "auto" keeps the experts' (widest) dtype
OUT_DTYPES: tuple[str, ...] = ("auto", *DTYPES)
# short aliases accepted wherever a dtype name is parsed
DTYPE_ALIASES: dict[str, str] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16",
                                 "fp64": "float64"}

# output formats with a one-line description each ("auto": the input's family and layout)
OUTPUT_FORMAT_LABELS: dict[str, str] = {
    "auto": "Same as the input",
    "llava-bin": "LLaVA mm_projector.bin",
    "safetensors": "safetensors",
    "hf-llava": "HF Llava layout (model.safetensors)",
}
OUTPUT_FORMATS: tuple[str, ...] = tuple(OUTPUT_FORMAT_LABELS)
