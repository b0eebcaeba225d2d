"""PivotMerge stage 3: Alignment-guided Layer-wise Merging (ALM), one coefficient (or one
refit) per layer.

Why: layers contribute unevenly to alignment, so one global coefficient is wrong.
Data-free: ``lambda_l = 1 + e_l (rho_l - 1)`` restores the update magnitude cancellation
removed (``rho_l``, clipped to [1, K]) in proportion to the layer's shared energy ``e_l``;
with no shared init the task vectors sum to zero by construction and lambda stays 1.
Data-driven (``alm="data"``): a progressive closed-form ridge refit of every linear layer
on the pivot-aligned experts' own-domain outputs, pulled towards the data-free merge.
``alm="data-lambda"``: Levenberg-Marquardt on one coefficient per layer (ablation).
Rationale and measurements: docs/PIVOTMERGE.md.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass, field

import torch

from ...errors import ParameterError
from ...linalg import lapack_threads, solve_normal_equations
from ...progress import ProgressEvent
from ...projector import Projector, forward_layer_names
from ..base import MergeJob
from .report import AlmReport, LayerFit, LayerRow
from .sdf import SdfResult, layer_of
from .settings import Settings

LAMBDA_MAX = 4.0  # upper bound of a data-driven layer coefficient (alm="data-lambda")
FIT_FP64_LIMIT = 2048  # Gram solves in fp64 up to this size, fp32 (ridge-conditioned) above
NO_INIT_NOTE = ("no shared init: task vectors measured from the experts' mean sum to "
                "zero by construction, so their norm loss is not interference and "
                "the data-free rescale keeps lambda = 1")


@dataclass
class AlmResult:
    """Per layer the final coefficient (``tau_star`` of refitted layers already replaced)."""

    lam: dict[str, float]
    coefficients: dict[str, float]
    fitted: set[str] = field(default_factory=set)
    report: AlmReport | None = None


def data_free_lambdas(
    layer_names: list[str], sdf: SdfResult, mode: str, mean_reference: bool, k_exp: int
) -> dict[str, float]:
    """``1 + e_l (rho_l - 1)`` per layer, 1 where ALM is off or has nothing to restore."""
    shared_frac = sdf.shared_fraction()
    lam: dict[str, float] = {}
    for lname in layer_names:
        typ = math.sqrt(sdf.typical_sq.get(lname, 0.0))
        mer = math.sqrt(sdf.merged_sq.get(lname, 0.0))
        if mode == "off" or mer == 0.0 or (mode in ("data-free", "data") and mean_reference):
            lam[lname] = 1.0
        else:  # data-free value; also the data-driven starting point
            rho = min(max(typ / mer, 1.0), float(k_exp))
            lam[lname] = 1.0 + shared_frac.get(lname, 1.0) * (rho - 1.0)
    return lam


def run_alm(
    job: MergeJob, ref: Projector, aligned: list[Projector], sdf: SdfResult, s: Settings, mode: str,
    cal_x: list[torch.Tensor] | None, cal_y: list[torch.Tensor] | None, weights: torch.Tensor,
) -> Generator[ProgressEvent, None, AlmResult]:
    """Stage 3 (progress 0.83 to 0.96). Refitted updates replace ``sdf.tau_star`` entries."""
    job.cancel.raise_if_cancelled()
    layer_names = [l.name for l in ref.layers]
    user = dict(job.layer_coefficients or {})
    unknown = [n for n in user if n not in layer_names]
    if unknown:
        raise ParameterError("pivotmerge", "layer_coefficients",
                             f"unknown layer '{unknown[0]}'; layers are {', '.join(layer_names)}")
    mean_reference = job.base is None
    report = AlmReport(mode=mode)
    if mode in ("data-free", "data") and mean_reference:
        report.note = NO_INIT_NOTE
    lam = data_free_lambdas(layer_names, sdf, mode, mean_reference, len(aligned))
    fitted_layers: set[str] = set()
    if mode == "data-lambda":
        assert cal_x is not None and cal_y is not None
        # a layer whose merged update vanished (e.g. 1-D tensors averaged around their own
        # mean) has no direction to scale: fitting it would only chase rounding noise
        forward_layers = set(forward_layer_names(ref.ops))
        free = [n for n in layer_names if n in forward_layers and n not in user
                and sdf.merged_sq.get(n, 0.0) > 1e-10 * max(sdf.typical_sq.get(n, 0.0), 1e-30)]
        fixed = {n: float(user[n]) if n in user else 1.0 for n in layer_names}
        fitted = yield from fit_lambdas(job, ref, sdf.tau_star, free, fixed, cal_x, cal_y, weights, report)
        for n in layer_names:
            lam[n] = fitted.get(n, 1.0) if n in free else 1.0
    elif mode == "data":
        assert cal_x is not None
        prior = {n: float(user[n]) if n in user else lam[n] for n in layer_names}
        updates = yield from fit_layers(job, ref, aligned, sdf.tau_star, prior, set(user), cal_x,
                                        weights, float(s.alm_ridge), report, float(s.alm_uncovered_weight))
        for key, upd in updates.items():  # fitted update replaces lambda * tau*
            sdf.tau_star[key] = upd.to(job.dtype)
            fitted_layers.add(layer_of(key))
        for n in fitted_layers:
            lam[n] = 1.0
    if report.data_driven:
        cal = job.calibration
        report.domains = list(cal.domains) if cal is not None and cal.domains else None
        if cal is not None and cal.missing:
            names = list(job.expert_names or [f"expert {k}" for k in range(len(job.experts))])
            report.uncovered = [names[k] for k in cal.missing]
    coeff = {n: float(user[n]) if n in user else float(s.scale) * lam[n] for n in layer_names}
    return AlmResult(lam, coeff, fitted_layers, report)


def layer_rows(
    layer_names: list[str], alm: AlmResult, sdf: SdfResult, user: set[str], mode: str
) -> list[LayerRow]:
    """The report's per-layer rows: lambda, final coefficient and its source."""
    shared_frac = sdf.shared_fraction()
    rows = []
    for n in layer_names:
        if n in user:
            source = "user"
        elif n in alm.fitted:
            source = "alm-data-fit"
        elif mode == "data":
            source = "alm-data-free-prior"
        elif mode == "off":
            source = "scale"
        else:
            source = "alm-" + mode
        rows.append(LayerRow(
            layer=n, lam=alm.lam[n], coefficient=alm.coefficients[n], source=source,
            fitted=n in alm.fitted, shared_energy_fraction=shared_frac.get(n, 1.0),
            typical_update_norm=math.sqrt(sdf.typical_sq.get(n, 0.0)),
            merged_update_norm=math.sqrt(sdf.merged_sq.get(n, 0.0)),
        ))
    return rows


def fit_layers(
    job: MergeJob, ref: Projector, aligned: list[Projector], tau_star: dict[str, torch.Tensor],
    prior_coeff: dict[str, float], fixed: set[str], xs: list[torch.Tensor], weights: torch.Tensor,
    ridge: float, report: AlmReport, uncovered_weight: float = 1.0,
) -> Generator[ProgressEvent, None, dict[str, torch.Tensor]]:
    """Data-driven ALM: progressive, alignment-guided ridge refit of every linear layer.

    Starts from the data-free merge ``P = ref + prior_coeff * tau*`` (every layer). For
    each linear layer l in forward order that the user did not fix:
    inputs ``H_k`` = expert k's own-domain calibration features run through the MERGED
    layers before l (already refitted); targets ``T_k`` = pivot-aligned expert k's own
    pre-activation output of layer l on the same features run through ITS OWN earlier
    layers (for the last layer: f_k(x)). Solve
    ``min_W,b sum_k (w_k / n_k) ||H_k W^T + b - T_k||^2 + mu ||[W b] - [P_W P_b]||^2``
    in closed form, ``mu = ridge * trace(G) / N`` with ``G`` the weighted Gram of
    ``[H_k 1]`` and N the calibration tokens (dual form when N < unknowns; a solve that
    would raise the residual keeps the prior). Fills ``report``; returns the fitted
    updates "layer.role" -> fitted value - ref (fp32). An expert whose domain has no
    features arrives with the other domains' features pooled as its inputs; its rows
    weigh ``uncovered_weight`` times a covered domain's (on those shared inputs its
    targets compete with the covered experts'; benchmarks/missing_domain.py)."""
    dev = job.device
    ref32 = ref.to(dev, torch.float32)
    ref_state = ref32.state()
    cur = {}
    for key, r in ref_state.items():
        cur[key] = r + prior_coeff[layer_of(key)] * tau_star[key].to(dev, torch.float32)
    experts32 = [a.to(dev, torch.float32) for a in aligned]
    xs = [x.to(dev, torch.float32) for x in xs]
    wk = [float(w) for w in weights]
    for k in job.calibration.missing if job.calibration is not None else []:
        wk[k] *= uncovered_weight  # its stand-in inputs are the covered domains': it competes there
    order = forward_layer_names(ref.ops, heads=("linear",))
    targets_layers = [n for n in dict.fromkeys(order)
                      if n not in fixed and ref32.layer(n).weight.dim() == 2]
    # expert k's own pre-activations of every fitted layer on its own domain
    own_inputs, own_out = [], []
    with torch.no_grad():
        for e, x in zip(experts32, xs):
            y, inp = e.forward_with_inputs(x, capture=True)
            own_out.append(y)
            own_inputs.append(inp)

    def objective(state: dict[str, torch.Tensor]) -> float:
        m = ref32.with_state(state)
        tot = 0.0
        with torch.no_grad():
            for k, (y, x) in enumerate(zip(own_out, xs)):
                d = m.forward(x) - y
                tot += wk[k] * float(d.double().pow(2).sum()) / x.shape[0]
        return tot

    at1 = {k: ref_state[k] + tau_star[k].to(dev, torch.float32) for k in ref_state}
    report.objective_at_1, report.objective_prior = objective(at1), objective(cur)
    report.alm_ridge = ridge
    report.tokens_per_domain = [int(x.shape[0]) for x in xs]
    report.targets = ("each expert's own layer output on its own domain (own earlier layers); "
                      "inputs through the merged earlier layers")
    report.layers = []
    updates: dict[str, torch.Tensor] = {}
    n_lay = max(1, len(targets_layers))
    for li, name in enumerate(targets_layers):
        job.cancel.raise_if_cancelled()
        yield ProgressEvent("alm", 0.83 + 0.13 * li / n_lay,
                            f"PivotMerge: refitting layer {name} on calibration features")
        layer = ref32.layer(name)
        has_bias = layer.bias is not None
        wkey, bkey = f"{name}.weight", f"{name}.bias"
        merged = ref32.with_state(cur)
        rows_h, rows_r = [], []
        n_tok = 0
        with torch.no_grad():
            for k, (e, x) in enumerate(zip(experts32, xs)):
                h = merged.forward_with_inputs(x, capture=True)[1][name]
                h = h.reshape(-1, h.shape[-1])
                el = e.layer(name)
                own = own_inputs[k][name]
                t = torch.nn.functional.linear(own, el.weight, el.bias).reshape(-1, el.weight.shape[0])
                pw = cur[wkey]
                pred = h @ pw.t() + (cur[bkey] if has_bias else 0.0)
                c = math.sqrt(wk[k] / h.shape[0])
                if has_bias:
                    h = torch.cat([h, h.new_ones(h.shape[0], 1)], 1)
                rows_h.append(h * c)
                rows_r.append((t - pred) * c)
                n_tok += int(h.shape[0])
        a = torch.cat(rows_h, 0)
        r = torch.cat(rows_r, 0)
        n, d = a.shape
        fdt = torch.float64 if min(n, d) <= FIT_FP64_LIMIT else torch.float32
        a_, r_ = a.to(fdt), r.to(fdt)
        before = float(r_.pow(2).sum())
        gram_trace = float(a_.pow(2).sum())
        mu = ridge * gram_trace / n
        with lapack_threads(min(n, d) > 1024 or dev.type != "cpu"):
            if n < d:  # dual form: (A^T A + mu I)^-1 A^T R = A^T (A A^T + mu I)^-1 R
                lhs = a_ @ a_.t()
                lhs.diagonal().add_(mu)
                delta_t = a_.t() @ solve_normal_equations(lhs, r_)
            else:
                lhs = a_.t() @ a_
                lhs.diagonal().add_(mu)
                delta_t = solve_normal_equations(lhs, a_.t() @ r_)
        after_r = r_ - a_ @ delta_t
        after = float(after_r.pow(2).sum())
        if not math.isfinite(after) or after > before:  # never worse than the prior
            delta_t = torch.zeros_like(delta_t)
            after = before
        delta = delta_t.t().to(torch.float32)  # [d_out, d_in (+1)]
        cur[wkey] = cur[wkey] + delta[:, : layer.weight.shape[1]]
        if has_bias:
            cur[bkey] = cur[bkey] + delta[:, -1]
        report.layers.append(LayerFit(
            layer=name, tokens=n_tok, mu=mu, alm_ridge=ridge, residual_before=before,
            residual_after=after, solve=("dual " if n < d else "primal ") + str(fdt).replace("torch.", ""),
        ))
        for key in ([wkey, bkey] if has_bias else [wkey]):
            updates[key] = cur[key] - ref_state[key]
    report.objective = objective(cur)
    report.iterations = len(targets_layers)
    return updates


def fit_lambdas(
    job: MergeJob, ref: Projector, tau_star: dict[str, torch.Tensor], free: list[str],
    fixed: dict[str, float], xs: list[torch.Tensor], ys: list[torch.Tensor], weights: torch.Tensor,
    report: AlmReport,
) -> Generator[ProgressEvent, None, dict[str, float]]:
    """Levenberg-Marquardt on the free per-layer lambdas (forward-mode Jacobian).

    Objective: sum_k w_k mean_{x in D_k} ||f(x) - f_k(x)||^2, starting from lambda = 1;
    only steps that lower it are accepted; lambdas are kept in [0, LAMBDA_MAX]. Fills
    ``report``; returns the fitted lambda per free layer."""
    # fitted in fp32 whatever the compute dtype (a few scalars; bf16 steps would stall)
    ref_state = {k: v.detach().float() for k, v in ref.state().items()}
    tau = {k: v.detach().float() for k, v in tau_star.items()}
    xs = [x.float() for x in xs]
    ys = [y.float() for y in ys]
    n_free = len(free)
    idx = {n: i for i, n in enumerate(free)}

    def forward(lam: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        st = {}
        for key, r in ref_state.items():
            ln = layer_of(key)
            c = lam[idx[ln]] if ln in idx else fixed[ln]
            st[key] = r + c * tau[key]
        return ref.with_state(st).forward(x)

    def objective(lam: torch.Tensor) -> float:
        tot = 0.0
        with torch.no_grad():
            for k, (x, y) in enumerate(zip(xs, ys)):
                d = (forward(lam, x) - y).float()
                tot += float(weights[k]) * float(d.pow(2).sum()) / x.shape[0]
        return tot

    lam = torch.ones(n_free, dtype=torch.float32, device=job.device)
    start = objective(lam)
    report.objective_at_1 = start
    if n_free == 0:
        report.objective, report.iterations = start, 0
        return {}
    cur = start
    mu = 1e-3
    iters = 0
    from torch.func import jvp

    for it in range(12):
        job.cancel.raise_if_cancelled()
        yield ProgressEvent("alm", 0.83 + 0.13 * it / 12,
                            f"PivotMerge: fitting layer coefficients (objective {cur:.4g})")
        jtj = torch.zeros(n_free, n_free, dtype=torch.float64)
        jtr = torch.zeros(n_free, dtype=torch.float64)
        for k, (x, y) in enumerate(zip(xs, ys)):
            wk = float(weights[k]) / x.shape[0]
            cols = []
            res = None
            for j in range(n_free):
                e = torch.zeros_like(lam)
                e[j] = 1.0
                out, tan = jvp(lambda l, x=x: forward(l, x), (lam,), (e,))
                if res is None:
                    res = (out - y).double().flatten()
                cols.append(tan.double().flatten())
            jac = torch.stack(cols, 1).cpu()
            res = res.cpu()
            jtj += wk * jac.t() @ jac
            jtr += wk * jac.t() @ res
        improved = False
        damp = jtj.diag().clamp(min=1e-9 * float(jtj.diag().max().clamp(min=1e-30)))
        for _ in range(8):
            a = jtj + mu * torch.diag(damp)
            step = torch.linalg.solve(a, -jtr)
            # coefficients stay in [0, LAMBDA_MAX]: a negative or huge lambda only fits
            # the calibration features, it does not merge experts
            cand = (lam + step.to(lam.dtype).to(lam.device)).clamp(0.0, LAMBDA_MAX)
            val = objective(cand)
            if val < cur:
                lam, mu, improved = cand, max(mu / 10, 1e-9), True
                rel = (cur - val) / max(cur, 1e-30)
                cur = val
                break
            mu *= 10
        iters = it + 1
        if not improved or rel < 1e-6:
            break
    report.objective, report.iterations = cur, iters
    report.tokens_per_domain = [int(x.shape[0]) for x in xs]
    return {n: float(lam[i]) for n, i in idx.items()}
