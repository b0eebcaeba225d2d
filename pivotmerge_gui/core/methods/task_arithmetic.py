"""Task Arithmetic (Ilharco et al., 2023) and the shared base of every task-vector method.

theta = theta_0 + lambda * sum_k w_k * tau_k with tau_k = theta_k - theta_0.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

import torch

from ..errors import NeedsBaseError
from ..progress import ProgressEvent
from .base import MergeJob, MergeOutput, Param, TensorMergeMethod, register
from .common import task_vectors, weighted


class TaskVectorMethod(TensorMergeMethod):
    """Per-tensor method on weighted task vectors that also fills a per-tensor report.

    Subclasses implement :meth:`merge_update`, which gets the stack of weighted task
    vectors ``w_k * (theta_k - base)`` [K, *shape] and returns the merged update (already
    scaled by the method's own scale); this class adds it back onto the base. Facts a
    subclass writes into ``facts`` end up in ``MergeOutput.report["tensors"][name]``.
    """

    needs_base = True
    # eigh/svd/cholesky have no half-precision kernels: methods that decompose matrices set
    # this and get their task vectors in float32 when the compute dtype is fp16/bf16
    uses_linalg = False

    def param(self, job: MergeJob, name: str) -> Any:
        """A method parameter from the job, or its default when the job leaves it out."""
        return job.params[name] if name in job.params else self.defaults()[name]

    def merge_update(
        self,
        name: str,
        kind: str,
        role: str,
        taus: torch.Tensor,
        job: MergeJob,
        gen: torch.Generator,
        facts: dict[str, Any],
    ) -> torch.Tensor:
        raise NotImplementedError

    def reference(
        self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None, job: MergeJob
    ) -> torch.Tensor:
        """The point task vectors are measured from (the shared init by default)."""
        if base is None:
            raise NeedsBaseError(self.name)
        return base

    def merge_one(
        self,
        name: str,
        kind: str,
        role: str,
        tensors: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        job: MergeJob,
        gen: torch.Generator,
        facts: dict[str, Any],
    ) -> torch.Tensor:
        ref = self.reference(tensors, base, job)
        if self.takes_stored_dtype:  # experts in their stored dtype: see MergeMethod
            # one that widens exactly to the compute dtype (bf16 -> fp32) is subtracted as it
            # is (torch computes in the promoted dtype: the same task vector); others are
            # converted as the pipeline would have
            tensors = [t if torch.promote_types(t.dtype, job.dtype) == job.dtype else t.to(job.dtype)
                       for t in tensors]
        taus = task_vectors(tensors, ref)
        if any(w != 1.0 for w in job.expert_weights):
            taus = weighted(taus, job.expert_weights)
        if self.uses_linalg and taus.dtype in (torch.float16, torch.bfloat16):
            update = self.merge_update(name, kind, role, taus.float(), job, gen, facts).to(taus.dtype)
        else:
            update = self.merge_update(name, kind, role, taus, job, gen, facts)
        return ref + update

    def merge_tensor(self, name, kind, role, tensors, base, job, gen):  # type: ignore[override]
        return self.merge_one(name, kind, role, tensors, base, job, gen, {})

    def merge(self, job: MergeJob) -> Generator[ProgressEvent, None, MergeOutput]:
        if self.needs_base and job.base is None:
            raise NeedsBaseError(self.name)
        ref = job.experts[0]
        states = [e.state() for e in job.experts]
        base_state = job.base.state() if job.base is not None else None
        total = sum(len(layer.tensors) for layer in ref.layers)
        out: dict[str, torch.Tensor] = {}
        per_tensor: dict[str, dict[str, Any]] = {}
        i = 0
        for layer in ref.layers:
            for role in layer.tensors:
                key = f"{layer.name}.{role}"
                job.cancel.raise_if_cancelled()
                yield ProgressEvent("merge", i / total, f"{self.pretty_name}: {key}")
                facts: dict[str, Any] = {}
                out[key] = self.merge_one(
                    key,
                    layer.kind,
                    role,
                    [s[key] for s in states],
                    base_state[key] if base_state is not None else None,
                    job,
                    job.generator(salt=i),
                    facts,
                )
                if facts:
                    per_tensor[key] = facts
                i += 1
        yield ProgressEvent("merge", 1.0, f"{self.pretty_name}: done")
        report: dict[str, Any] = {"method": self.name, "params": dict(job.params)}
        if per_tensor:
            report["tensors"] = per_tensor
        return MergeOutput(out, report)


@register
class TaskArithmetic(TaskVectorMethod):
    name = "task_arithmetic"
    pretty_name = "Task Arithmetic"
    reference_url = "https://arxiv.org/abs/2212.04089"
    description = (
        "Adds the scaled sum of the experts' task vectors to the shared init: "
        "theta_0 + lambda * sum_k w_k tau_k. Reference default lambda = 0.3 (FusionBench; "
        "the paper tunes lambda on validation data)."
    )
    params = (
        Param("scaling", float, 0.3, "lambda: scale of the summed task vectors", min=0.0, max=5.0,
              is_scale=True),
    )

    def merge_update(self, name, kind, role, taus, job, gen, facts):
        return self.param(job, "scaling") * taus.sum(0)
