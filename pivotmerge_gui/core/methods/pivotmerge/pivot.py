"""PivotMerge stage 1: choose the pivot expert and align every expert's hidden units to it.

Why: task vectors can only be compared entry by entry when hidden unit i means the same
feature in every expert; projectors from different inits differ by a permutation, which
weight matching (:mod:`...alignment`) undoes exactly. The pivot is the user's choice, else
the expert that best matches every domain's expert on calibration data, else the medoid.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import torch

from ...alignment import AlignmentInfo, align_to_pivot, identity_info, shares_coordinates
from ...errors import ParameterError
from ...progress import ProgressEvent, rescaled
from ...projector import Projector, token_group
from ..base import MergeJob
from .report import ExpertAlignment, PivotChoice


@dataclass
class PivotStage:
    """Result of stage 1: the pivot and the experts in its frame."""

    choice: PivotChoice
    aligned: list[Projector]
    infos: list[AlignmentInfo]
    did_align: bool

    def report(self, names: list[str]) -> list[ExpertAlignment]:
        return [ExpertAlignment(names[i], self.did_align, inf) for i, inf in enumerate(self.infos)]


def expert_names(job: MergeJob) -> list[str]:
    return list(job.expert_names or [e.source or f"expert {i}" for i, e in enumerate(job.experts)])


def calibration_batches(job: MergeJob, max_tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Evenly spaced subsample of each domain's features and the expert's own outputs. An
    expert whose domain has no features gets the others' pooled (its own outputs on them
    are the targets: see :meth:`Calibration.with_stand_ins`)."""
    xs, ys = [], []
    assert job.calibration is not None
    group = token_group(job.experts[0].ops)  # token-merging families keep whole groups
    for k, feats in enumerate(job.calibration.with_stand_ins().features):
        assert feats is not None
        x = feats.to(job.device, job.dtype)
        n = x.shape[0] // group
        if n > max(1, max_tokens // group):
            m = max(1, max_tokens // group)
            idx = torch.linspace(0, n - 1, m).round().long().to(x.device)
            x = x[: n * group].reshape(n, group, *x.shape[1:])[idx].reshape(m * group, *x.shape[1:])
        with torch.no_grad():
            ys.append(job.experts[k].forward(x))
        xs.append(x)
    return xs, ys


def calibration_scores(experts: list[Projector], xs: list[torch.Tensor], ys: list[torch.Tensor]) -> list[float]:
    """Alignment score of expert i = mean over domains j of the cosine similarity between
    its outputs and domain j's own expert's outputs on domain j's features."""
    scores = []
    with torch.no_grad():
        for e in experts:
            per = []
            for x, y in zip(xs, ys):
                out = e.forward(x).float().reshape(-1, y.shape[-1])
                per.append(float(torch.nn.functional.cosine_similarity(
                    out, y.float().reshape(-1, y.shape[-1]), dim=-1).mean()))
            scores.append(sum(per) / len(per))
    return scores


def medoid_scores(aligned: list[Projector]) -> list[float]:
    """Mean cosine similarity of each expert's flattened weights to the others."""
    k = len(aligned)
    if k == 1:
        return [1.0]
    states = [a.state() for a in aligned]
    gram = torch.zeros(k, k, dtype=torch.float64)
    for key in states[0]:
        flats = [s[key].float().reshape(-1) for s in states]
        # one dot product per pair: no [K, model] stack (268 MB for 4 LLaVA-1.5 experts,
        # the merge's peak memory on different inits), and faster than the stacked product
        for i in range(k):
            for j in range(i, k):
                v = float(torch.dot(flats[i], flats[j]))
                gram[i, j] += v
                if i != j:
                    gram[j, i] += v
    d = gram.diag().sqrt().clamp(min=1e-30)
    cos = gram / d[:, None] / d[None, :]
    return [float((cos[i].sum() - 1.0) / (k - 1)) for i in range(k)]


def align_experts(
    job: MergeJob, experts: list[Projector], pivot: int, names: list[str], precision: str = "auto"
) -> Generator[ProgressEvent, None, tuple[list[Projector], list[AlignmentInfo]]]:
    """Every expert aligned to ``experts[pivot]`` (the pivot itself as is), with progress
    events over [0, 1); ``precision``: the ``align_precision`` setting."""
    cache: dict = {}
    aligned, infos = [], []
    for i, e in enumerate(experts):
        job.cancel.raise_if_cancelled()
        yield ProgressEvent("align", i / len(experts),
                            f"PivotMerge: aligning hidden units of {names[i]} to {names[pivot]}")
        if i == pivot:
            a, info = e, identity_info(e)
        else:
            a, info = align_to_pivot(e, experts[pivot], cache=cache, precision=precision)
        aligned.append(a)
        infos.append(info)
    return aligned, infos


def choose_pivot_and_align(
    job: MergeJob, pivot: int, align: bool, cal_x: list[torch.Tensor] | None,
    cal_y: list[torch.Tensor] | None, precision: str = "auto",
) -> Generator[ProgressEvent, None, PivotStage]:
    """Stage 1 (progress 0 to 0.3): ``pivot`` -1 = automatic; ``align`` = hidden-unit
    alignment requested (it runs only where the family has hidden-unit pairs)."""
    experts = job.experts
    names = expert_names(job)
    k_exp = len(experts)
    job.cancel.raise_if_cancelled()
    yield ProgressEvent("pivot", 0.0, "PivotMerge: choosing the pivot")
    aligned = list(experts)
    infos: list[AlignmentInfo] = [identity_info(e) for e in experts]
    scores: list[float] | None = None
    if pivot >= k_exp:
        raise ParameterError("pivotmerge", "pivot", f"{pivot} is not an expert index (0..{k_exp - 1})")
    do_align = align and bool(experts[0].hidden_pairs())
    aligned_done = False
    requested = do_align
    if do_align and job.base is not None and all(shares_coordinates(e, job.base) for e in experts):
        # fine-tuned from the given base: every expert is in its frame, so the weight matching
        # would return the identity; the cheap test replaces the search (same result)
        do_align = False
        yield ProgressEvent("align", 0.15, "PivotMerge: every expert is in the base's frame (shared "
                            "init): no hidden-unit permutation search needed")
    if pivot >= 0:
        chosen_by = "user"
    elif cal_x is not None and cal_y is not None:
        chosen_by = "calibration: best mean alignment score over all domains"
        scores = calibration_scores(experts, cal_x, cal_y)
        pivot = int(torch.tensor(scores).argmax())
    else:
        chosen_by = "medoid: largest mean cosine similarity" + (" after alignment" if do_align else "")
        if do_align:
            # provisional frame: expert 0; re-aligned to the medoid only if that changes it
            aligned, infos = yield from rescaled(align_experts(job, experts, 0, names, precision), 0.02, 0.15)
        scores = medoid_scores(aligned)
        pivot = int(torch.tensor(scores).argmax())
        if do_align and (pivot == 0 or all(inf.is_identity for inf in infos)):
            aligned_done = True  # every expert already sits in the pivot's frame
            infos[pivot] = identity_info(experts[pivot])
        else:
            aligned = list(experts)
            infos = [identity_info(e) for e in experts]
    choice = PivotChoice(pivot, names[pivot], chosen_by, scores)
    yield ProgressEvent("pivot", 0.16, f"PivotMerge: pivot = {names[pivot]} ({chosen_by})")
    if do_align and not aligned_done:
        aligned, infos = yield from rescaled(align_experts(job, experts, pivot, names, precision), 0.16, 0.3)
    if requested and not do_align:
        infos = [identity_info(e, "shared-base-frame") for e in experts]
    return PivotStage(choice, aligned, infos, requested)
