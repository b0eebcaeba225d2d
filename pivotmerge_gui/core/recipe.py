"""The merge recipe: one YAML document for the GUI, the CLI and provenance.

Keys follow mergekit's conventions (``merge_method``, ``base_model``, ``models`` with
per-model ``parameters``, ``parameters``, ``dtype``) so its users feel at home. Unknown keys
and wrong types are errors (:class:`~pivotmerge_gui.core.errors.RecipeError`) that name the
key. ``schema_version`` lets later releases migrate old documents.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .bounded import read_text_document, yaml_document
from .errors import RecipeError
from .io.discovery import display_name
from .options import DTYPES, OUT_DTYPES, OUTPUT_FORMATS

SCHEMA_VERSION = 1
MAX_RECIPE_CHARS = 1_000_000  # thousands of experts fit; a runaway document does not
# the value types of the recipe's name fields, built from the one list of names
DtypeName = Literal[DTYPES]  # type: ignore[valid-type]
OutDtypeName = Literal[OUT_DTYPES]  # type: ignore[valid-type]
OutputFormatName = Literal[OUTPUT_FORMATS]  # type: ignore[valid-type]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True)


class ModelParameters(_Strict):
    weight: float = Field(1.0, ge=0.0, description="per-expert weight")


class ModelEntry(_Strict):
    model: str = Field(min_length=1, description="path or Hub id (org/name[@revision][:file])")
    name: str | None = Field(None, description="display name (defaults to the path's folder)")
    parameters: ModelParameters = Field(default_factory=ModelParameters)


class CalibrationRef(_Strict):
    file: str = Field(min_length=1, description="calibration file (safetensors, one tensor per domain)")
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$",
                               description="the file's sha256; a different file is refused")
    domains: dict[str, str | None] | None = Field(
        None, description="expert name -> domain of the file (null: no data for that expert); "
                          "default: the domain named like the expert")


class Recipe(_Strict):
    schema_version: int = SCHEMA_VERSION
    merge_method: str = Field(min_length=1)
    base_model: str | None = None
    models: list[ModelEntry] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    layer_coefficients: dict[str, float] | None = None
    calibration: CalibrationRef | None = Field(
        None, description="calibration features: a file name, or {file, sha256, domains}"
    )
    dtype: DtypeName = "float32"
    out_dtype: OutDtypeName = "auto"
    output_format: OutputFormatName = "auto"
    into: str | None = Field(
        None, min_length=1, description="full-model export: the model folder or Hub id the merged projector goes into"
    )
    device: str = "auto"
    random_seed: int = Field(0, ge=-(2**63), lt=2**64, description="any 64-bit seed (torch's range)")

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"unsupported schema_version {v}; this release reads {SCHEMA_VERSION}")
        return v

    @field_validator("calibration", mode="before")
    @classmethod
    def _calibration_file(cls, v: Any) -> Any:
        return {"file": v} if isinstance(v, str) else v  # the short form: just the file

    @field_validator("parameters")
    @classmethod
    def _plain_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        for k, val in v.items():
            if not isinstance(k, str):
                raise ValueError(f"parameter names must be strings, got {k!r}")  # noqa: TRY004 - pydantic wants ValueError
            if isinstance(val, float) and not math.isfinite(val):
                raise ValueError(f"parameter '{k}' is {val}; only finite numbers are allowed")
        return v

    # ------------------------------------------------------------------ YAML
    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError("a recipe must be a mapping of keys to values", source)
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise RecipeError(_format_validation(e), source) from None

    @classmethod
    def from_yaml(cls, text: str, source: str | None = None) -> Recipe:
        data = yaml_document(text, source, RecipeError, "recipe", MAX_RECIPE_CHARS)
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Recipe:
        p = Path(path)
        text = read_text_document(p, RecipeError, "recipe")
        return cls.from_yaml(text, str(p))

    def to_dict(self) -> dict[str, Any]:
        d = self.model_dump(mode="json")
        # drop defaults that only add noise, keep the document mergekit-like
        for e in d["models"]:
            if e.get("name") is None:
                e.pop("name", None)
        for key in ("layer_coefficients", "calibration", "base_model", "into"):
            if d.get(key) is None:
                d.pop(key)
        cal = d.get("calibration")
        if cal is not None:
            d["calibration"] = {k: v for k, v in cal.items() if v is not None}
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = True) -> Path:
        from .io.atomic import atomic_write_text

        return atomic_write_text(Path(path), self.to_yaml(), overwrite=overwrite)

    # ------------------------------------------------------------------ helpers
    @property
    def weights(self) -> list[float]:
        return [m.parameters.weight for m in self.models]

    def display_names(self) -> list[str]:
        return [m.name or display_name(m.model) for m in self.models]


def _format_validation(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(document)"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'")
        elif err["type"] == "missing":
            parts.append(f"missing key '{loc}'")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"'{loc}': {msg} (got {err.get('input')!r})")
    return "; ".join(parts)
