"""The registered ``pivotmerge`` method: metadata and the orchestration of its stages."""

from __future__ import annotations

import time
from collections.abc import Generator

import torch

from ...errors import MethodError, ParameterError
from ...progress import ProgressEvent
from ...projector import Projector, mean_projector
from ..base import MergeJob, MergeMethod, MergeOutput, register
from .alm import layer_rows, run_alm
from .pivot import calibration_batches, choose_pivot_and_align, expert_names
from .report import PivotMergeReport, Stages
from .sdf import layer_of, merge_task_vectors
from .settings import PARAMS, Settings


@register
class PivotMerge(MergeMethod):
    name = "pivotmerge"
    workspace_stacks = 0.5  # big layers keep task vectors implicit (sketches), measured 16 x 8192-wide
    pretty_name = "PivotMerge"
    reference_url = "https://arxiv.org/abs/2604.22823"
    description = (
        "Post-alignment merging of projectors: pick a pivot expert, align every expert's "
        "hidden units to it, split the task vectors into a shared subspace (filtered for "
        "sign conflicts) plus per-domain residuals (SDF), then rescale each layer (ALM: "
        "fitted on calibration features when given, else data-free). Only the paper's "
        "abstract is public: this is the project's documented reading of it "
        "(see PIVOTMERGE.md), every stage a toggle."
    )
    uses_base = True
    uses_calibration = True
    handles_layer_coefficients = True
    params = PARAMS

    def merge(self, job: MergeJob) -> Generator[ProgressEvent, None, MergeOutput]:
        t_start = time.perf_counter()
        s = Settings.from_params(job.params)
        k_exp = len(job.experts)
        weights = self._weights(job)
        cal = job.calibration
        mode = s.alm_mode(cal is not None)
        if mode in ("data", "data-lambda") and cal is None:
            raise MethodError(f"pivotmerge: alm='{mode}' needs calibration features; set alm to "
                              "'data-free' or provide calibration data")
        if cal is not None and len(cal.features) != k_exp:
            raise MethodError(f"pivotmerge: calibration has {len(cal.features)} domains but there "
                              f"are {k_exp} experts (one feature set per expert's domain)")
        report = PivotMergeReport(Stages(s.align_hidden_units, s.sdf, s.filter_conflicts,
                                         s.residuals and s.sdf, mode))
        cal_x, cal_y = calibration_batches(job, s.alm_tokens) if cal is not None else (None, None)
        names = expert_names(job)

        t0 = time.perf_counter()
        stage1 = yield from choose_pivot_and_align(job, int(s.pivot), bool(s.align_hidden_units),
                                                   cal_x, cal_y, precision=s.align_precision)
        report.pivot, report.alignment = stage1.choice, stage1.report(names)
        report.timings["pivot_and_alignment_s"] = time.perf_counter() - t0
        if job.owns_experts:
            # the unaligned working copies are not read again: drop them for their aligned,
            # function-identical versions (one model copy less per permuted expert)
            job.experts[:] = stage1.aligned

        job.cancel.raise_if_cancelled()
        ref = self._reference(job, stage1.aligned, report, names, stage1.infos)
        yield ProgressEvent("reference", 0.31, f"PivotMerge: reference = {report.reference}")

        t0 = time.perf_counter()
        states = [a.state() for a in stage1.aligned]
        release = job.owns_experts and mode != "data"
        if release:
            # nothing after SDF reads the experts' values in this mode (only the "data" fit
            # does): the lists keep their structure, and SDF lets each tensor go once merged
            # (Qwen2-VL's merger: 4 x 105 MB freed before its second big layer)
            job.experts[:] = stage1.aligned[:] = [a.to("meta") for a in stage1.aligned]
        sdf = yield from merge_task_vectors(job, ref, states, weights, s, release=release)
        del states
        report.tensors = sdf.tensors
        report.timings["sdf_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        alm = yield from run_alm(job, ref, stage1.aligned, sdf, s, mode, cal_x, cal_y, weights)
        report.alm = alm.report
        report.timings["alm_s"] = time.perf_counter() - t0

        job.cancel.raise_if_cancelled()
        yield ProgressEvent("compose", 0.97, "PivotMerge: composing theta = ref + lambda * tau*")
        ref_state = ref.state()
        out: dict[str, torch.Tensor] = {}
        for key in ref_state:
            t = sdf.tau_star.pop(key)  # composed in place: no second copy of every tensor
            out[key] = t.mul_(alm.coefficients[layer_of(key)]).add_(ref_state[key].to(t.dtype)).to(job.dtype)
        report.layers = layer_rows([l.name for l in ref.layers], alm, sdf,
                                   set(job.layer_coefficients or {}), mode)
        report.timings["total_s"] = time.perf_counter() - t_start
        yield ProgressEvent("compose", 1.0, "PivotMerge: done")
        return MergeOutput(out, report.to_dict())

    def _weights(self, job: MergeJob) -> torch.Tensor:
        """Expert weights with mean 1 (weights are relative)."""
        weights = torch.tensor(job.expert_weights, dtype=torch.float32, device=job.device)
        if (weights < 0).any() or float(weights.sum()) <= 0:
            raise ParameterError(self.name, "weight", "expert weights must be >= 0 with a positive sum")
        return weights * (len(job.experts) / weights.sum())

    @staticmethod
    def _reference(job: MergeJob, aligned: list[Projector], report: PivotMergeReport,
                   names: list[str], infos: list) -> Projector:
        """The point task vectors are measured from: the shared init, else the mean of the
        pivot-aligned experts."""
        if job.base is None:
            report.reference = "mean of the pivot-aligned experts (no shared init given)"
            return mean_projector(aligned).to(job.device, job.dtype)
        report.reference = "base (shared init)"
        moved = [names[i] for i, inf in enumerate(infos) if not inf.is_identity]
        if moved:
            report.warnings.append(
                "experts " + ", ".join(moved) + " needed a hidden-unit permutation to match the "
                "pivot: they may not share the base's init, so their task vectors relative to "
                "the base can be meaningless; consider merging without a base")
        return job.base
