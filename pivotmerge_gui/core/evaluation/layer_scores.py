"""Data-driven per-layer alignment scores, and calibration data from image-caption pairs.

**Definition.** For expert ``e`` (trained on domain ``d_e``), reference projector ``R``
(the shared init when given, else the mean of the experts, the same reference the
pipeline uses for layer coefficients) and layer ``l``:

    delta[e][l] = NLL_{d_e}(theta_e with layer l reset to R_l) - NLL_{d_e}(theta_e)

where ``NLL_d`` is the caption negative log-likelihood per token on domain ``d``'s pairs
(the alignment score the metrics use; teacher forced through the frozen LM). ``delta``
says how much of expert ``e``'s alignment on its own domain is carried by layer ``l``'s
update: large positive = the layer matters, about zero = the layer's update could be
dropped, negative = the update hurts on this data. It needs no gradients, only
``E * (L + 2)`` NLL passes. ``gain[e] = NLL(R) - NLL(theta_e)`` is what the whole update
buys, and ``share = delta / gain`` puts layers of different experts on one scale
(shares need not sum to one: layers interact through the non-linearity).

:func:`calibration_from_sets` turns the same pairs into the
:class:`~pivotmerge_gui.core.methods.base.Calibration` (visual features per expert
domain) that RegMean and PivotMerge's data-driven ALM consume.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..calibration import Calibration, calibration_from_features
from ..errors import PivotMergeError
from ..progress import CancelToken, ProgressEvent
from ..projector import Projector, check_compatible, mean_projector
from .backend import CaptionBackend, CaptionSet
from .metrics import prepare


@dataclass
class LayerAlignmentScores:
    """Per-expert, per-layer alignment contributions (see the module docstring)."""

    experts: list[str]
    domains: list[str]  # the domain each expert was scored on
    layers: list[str]
    delta: list[list[float]]  # [expert][layer], NLL per token
    expert_nll: list[float]  # each expert on its own domain
    reference_nll: list[float]  # the reference projector on each expert's domain
    reference: str  # "base" or "mean of experts"
    n_pairs: list[int]

    @property
    def gain(self) -> list[float]:
        """NLL the whole update removes on the expert's own domain."""
        return [r - e for r, e in zip(self.reference_nll, self.expert_nll)]

    def share(self) -> list[list[float]]:
        """``delta / gain`` per expert (0 where the expert gains nothing)."""
        return [[d / g if g > 1e-12 else 0.0 for d in row] for row, g in zip(self.delta, self.gain)]

    def per_layer(self) -> dict[str, float]:
        """Mean ``delta`` over experts for each layer (one number per layer for a table)."""
        n = max(len(self.experts), 1)
        return {l: sum(row[j] for row in self.delta) / n for j, l in enumerate(self.layers)}

    def table(self) -> list[dict[str, Any]]:
        """One row per (expert, layer) for a GUI table or a CSV."""
        shares = self.share()
        return [
            {"expert": e, "domain": d, "layer": l, "delta_nll": self.delta[i][j],
             "share": shares[i][j], "expert_nll": self.expert_nll[i], "reference_nll": self.reference_nll[i]}
            for i, (e, d) in enumerate(zip(self.experts, self.domains))
            for j, l in enumerate(self.layers)
        ]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gain": self.gain, "share": self.share(), "per_layer": self.per_layer()}


def match_domains(expert_names: Sequence[str], domains: Sequence[str],
                  expert_domains: Sequence[str] | None = None) -> list[str]:
    """The domain each expert is scored on: ``expert_domains`` when given; else the
    expert's own name when every name is a domain; else domains in order when the counts
    agree. Typed error otherwise (the user has to say which data belongs to which expert)."""
    if expert_domains is not None:
        out = list(expert_domains)
    elif all(n in domains for n in expert_names):
        out = list(expert_names)
    elif len(domains) == len(expert_names):
        out = list(domains)
    else:
        raise PivotMergeError(
            f"cannot tell which calibration domain belongs to which expert: {len(expert_names)} experts "
            f"({', '.join(expert_names)}) but domains {', '.join(domains) or '(none)'}; name the "
            "sub-folders (or the 'domain' field) after the experts"
        )
    if len(out) != len(expert_names):
        raise PivotMergeError(f"{len(out)} domains given for {len(expert_names)} experts")
    missing = [d for d in out if d not in domains]
    if missing:
        raise PivotMergeError(f"no calibration pairs for domain(s) {', '.join(missing)}")
    return out


def _nll_per_token(backend: CaptionBackend, proj: Projector, s: CaptionSet, cancel: CancelToken) -> float:
    assert s.features is not None
    nll, count = backend.caption_nll(proj, s.features, s.captions, cancel)
    return float(nll.sum() / count.sum().clamp_min(1))


def layer_alignment_scores(
    backend: CaptionBackend,
    experts: Mapping[str, Projector],
    sets: Mapping[str, CaptionSet],
    *,
    expert_domains: Sequence[str] | None = None,
    base: Projector | None = None,
    cancel: CancelToken | None = None,
) -> Generator[ProgressEvent, None, LayerAlignmentScores]:
    """Compute :class:`LayerAlignmentScores` (generator of progress; result returned and
    carried by the final "done" event)."""
    cancel = cancel or CancelToken()
    names = list(experts)
    if not names:
        raise PivotMergeError("layer alignment scores need at least one expert")
    projs = [experts[n] for n in names]
    check_compatible(projs + ([base] if base is not None else []),
                     names + (["base"] if base is not None else []))
    doms = match_domains(names, list(sets), expert_domains)
    sets = prepare(backend, {d: sets[d] for d in dict.fromkeys(doms)})
    ref = base if base is not None else mean_projector(projs)
    ref_state = ref.state()
    layers = [l.name for l in projs[0].layers]
    total = len(names) * (len(layers) + 2)
    step = 0
    delta: list[list[float]] = []
    e_nll: list[float] = []
    r_nll: list[float] = []
    for name, proj, dom in zip(names, projs, doms):
        s = sets[dom]
        own = _nll_per_token(backend, proj, s, cancel)
        refv = _nll_per_token(backend, ref, s, cancel)
        step += 2
        yield ProgressEvent("layer-scores", step / total, f"{name}: NLL {own:.3f} (reference {refv:.3f})")
        row = []
        state = proj.state()
        for layer in projs[0].layers:
            cancel.raise_if_cancelled()
            reset = dict(state)
            for role in layer.tensors:
                key = f"{layer.name}.{role}"
                reset[key] = ref_state[key].to(state[key].dtype)
            row.append(_nll_per_token(backend, proj.with_state(reset), s, cancel) - own)
            step += 1
            yield ProgressEvent("layer-scores", step / total, f"{name}: layer {layer.name} -> {row[-1]:+.3f}")
        delta.append(row)
        e_nll.append(own)
        r_nll.append(refv)
    result = LayerAlignmentScores(names, doms, layers, delta, e_nll, r_nll,
                                  "base" if base is not None else "mean of experts",
                                  [len(sets[d]) for d in doms])
    yield ProgressEvent("done", 1.0, "layer alignment scores ready", result)
    return result


def calibration_from_sets(
    backend: CaptionBackend,
    sets: Mapping[str, CaptionSet],
    domains: Sequence[str],
    *,
    max_tokens: int | None = 4096,
    seed: int = 0,
) -> Calibration:
    """Visual features (every visual token of every image) of each listed domain, in
    that order (= the experts' order), for RegMean and PivotMerge's data-driven ALM."""
    missing = [d for d in domains if d not in sets]
    if missing:
        raise PivotMergeError(f"no calibration pairs for domain(s) {', '.join(missing)}")
    ready = prepare(backend, {d: sets[d] for d in dict.fromkeys(domains)})
    feats: dict[str, torch.Tensor] = {}
    for d in domains:
        f = ready[d].features
        assert f is not None
        feats[d] = f
    return calibration_from_features([feats[d] for d in domains], list(domains), max_tokens=max_tokens, seed=seed)


def caption_sets_from_pairs(backend: CaptionBackend, pairs: Sequence[Any]) -> dict[str, CaptionSet]:
    """Group :class:`~pivotmerge_gui.core.evaluation.pairs.Pair` objects by domain into
    encoded caption sets for this back end."""
    from .pairs import group_by_domain, images_for_backend

    out: dict[str, CaptionSet] = {}
    for dom, idx in group_by_domain(pairs).items():
        images = images_for_backend(backend, [pairs[i].image for i in idx])
        out[dom] = CaptionSet(images, [pairs[i].caption for i in idx], backend.encode_images(images))
    return out
