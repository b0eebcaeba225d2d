"""The model card (``README.md``) written beside a merged projector.

Rendered from one template, like mergekit's card: YAML front matter for the Hub (library,
tags, method, base and experts, projector file), then the method with its reference, the
experts with weights and input hashes, the parameters, the method's report and the command
that reproduces the merge. Only the template's slots are computed here.
"""

from __future__ import annotations

import json
from string import Template
from typing import Any

import yaml

from .recipe import Recipe

CARD_TEMPLATE = Template("""\
---
${front_matter}
---

# Merged projector (${method_pretty})

Merged with **${method_pretty}** ([reference](${reference_url})) by PivotMerge Studio. \
The projector file is a drop-in replacement for the experts' own.

## Experts

| expert | weight | sha256 |
|---|---|---|
${expert_rows}

## Parameters

${parameter_lines}
${calibration_section}${extras_section}
## Merge report

```json
${method_report}
```

## Reproduce

```bash
pivotmerge merge recipe.yml OUT_DIR
```
${usage}""")


def model_card(result: Any, recipe: Recipe, filename: str, *, base_model: str | None = None,
               usage: str = "") -> str:
    """The card of a merge: ``result`` is a :class:`~pivotmerge_gui.core.pipeline.MergeResult`
    (its ``report``, ``names``, ``input_hashes`` and ``projector.family`` are used),
    ``recipe`` the recipe written beside it, ``filename`` the projector file's name. A
    full-model export (``usage``: its "Use the merged model" section) names the model it
    was spliced into as ``base_model`` (a Hub id; the merge's own base is ``merge_base``)."""
    rep = result.report
    front = {
        "library_name": "pivotmerge-studio",
        "tags": ["merge", "projector", "multimodal", rep["method"]],
        "merge_method": rep["method"],
        "base_model": recipe.base_model,
        "experts": [m.model for m in recipe.models],
        "projector_family": result.projector.family,
        "projector_file": filename,
    }
    if usage:
        front["merge_base"] = front.pop("base_model")
        front.update({"base_model": base_model} if base_model else {"into": recipe.into})
    rows = [
        f"| {name} (`{m.model}`) | {m.parameters.weight:g} | `{result.input_hashes.get(name, '')}` |"
        for name, m in zip(result.names, recipe.models)
    ]
    if recipe.base_model:
        rows.append(f"| base (`{recipe.base_model}`) | - | `{result.input_hashes.get('base', '')}` |")
    params = [f"- `{k}`: {v}" for k, v in rep["parameters"].items()]
    params.append(
        f"- compute dtype {rep['compute_dtype']}, output dtype {rep['out_dtype']}, "
        f"device {rep['device']}, seed {rep['seed']}"
    )
    if rep.get("layer_coefficients_applied"):
        params.append(f"- per-layer coefficients: {rep['layer_coefficients_applied']}")
    calibration_section = _calibration_section(rep.get("calibration"), recipe)
    extras = rep.get("extras") or []
    extras_section = "".join(
        ["\n## Other tensors of the adapter file\n\n| tensor | shape | dtype | how |\n|---|---|---|---|\n"]
        + [f"| `{e['key']}` | {e['shape']} | {e['dtype']} | {e['action']} |\n" for e in extras]
    ) if extras else ""
    return CARD_TEMPLATE.substitute(
        front_matter=yaml.safe_dump(front, sort_keys=False).strip(),
        method_pretty=rep["method_pretty"],
        reference_url=rep["reference_url"],
        expert_rows="\n".join(rows),
        parameter_lines="\n".join(params),
        calibration_section=calibration_section,
        extras_section=extras_section,
        method_report=json.dumps(rep["method_report"], indent=1, default=str)[:20000],
        usage="\n" + usage if usage else "",
    )


def _calibration_section(cal: dict[str, Any] | None, recipe: Recipe) -> str:
    """Where the calibration features came from (the file, its hash, each expert's domain
    and token count, and the encoder/sampling provenance the file records)."""
    if not cal:
        return ""
    ref = recipe.calibration
    lines = ["\n## Calibration\n"]
    if ref is not None:
        lines.append(f"File `{ref.file}`" + (f", sha256 `{ref.sha256}`" if ref.sha256 else "") + ".\n")
    lines.append("| expert | domain | tokens |\n|---|---|---|")
    for name, tokens in (cal.get("tokens") or {}).items():
        dom = (cal.get("domains") or {}).get(name)
        lines.append(f"| {name} | {dom or '(none: pooled stand-in)'} | {tokens:,} |")
    prov = cal.get("provenance") or {}
    enc = prov.get("encoder") or {}
    if enc.get("spec"):
        rev = f" @ {enc['revision']}" if enc.get("revision") else ""
        lines.append(f"\nEncoder: `{enc['spec']}`{rev}" + (f" (weights sha256 `{enc['sha256']}`)" if enc.get("sha256") else ""))
    feat = prov.get("features") or {}
    if feat:
        lines.append("Features: " + ", ".join(f"{k} {v}" for k, v in feat.items()))
    samp = prov.get("sampling") or {}
    if samp:
        lines.append("Sampling: " + ", ".join(f"{k} {v}" for k, v in samp.items()))
    if prov.get("tool"):
        lines.append(f"Made by {prov['tool']}" + (f" on {prov['created']}" if prov.get("created") else ""))
    return "\n".join(lines) + "\n"
