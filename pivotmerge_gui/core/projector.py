"""The canonical in-memory projector that every reader, method, analysis and writer uses.

A :class:`Projector` is an ordered list of :class:`Layer` objects (each a small group of
tensors: ``weight`` and optionally ``bias``) plus a tiny forward program (``ops``) that says
how the layers compute the projector's function. Canonical tensor names are
``"<layer name>.<role>"``; each layer also remembers the original key of every tensor in
the source checkpoint so that writers can produce a drop-in file with the same keys.

Forward program (``ops``), one string per step:

- ``linear:<layer>``                 y = x W^T + b
- ``layernorm:<layer>[:eps]``        LayerNorm over the last dim (default eps 1e-5)
- ``rmsnorm:<layer>[:eps]``          RMSNorm over the last dim (default eps 1e-6)
- ``gelu`` | ``gelu_tanh`` | ``relu`` | ``silu``
- ``merge_tokens:<n>``               concatenate every n consecutive tokens (Qwen2-VL merger)
- ``push`` / ``add``                 save the current value / add the saved value (residual)

Layers of kind ``vector`` (e.g. LLaVA-NeXT ``image_newline``) take no part in the forward.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from .errors import IncompatibleExperts, MethodError

LayerKind = Literal["linear", "layernorm", "rmsnorm", "vector"]
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
LAYER_OPS = ("linear", "layernorm", "rmsnorm")  # ops that apply a layer


class Op(NamedTuple):
    """One parsed step of the forward program: ``head[:layer][:arg]``.

    ``layer`` is the layer name for :data:`LAYER_OPS` (else ""); ``arg`` is the rest
    (a norm's eps, ``merge_tokens``' group size), "" when absent."""

    head: str
    layer: str = ""
    arg: str = ""

    @property
    def applies_layer(self) -> bool:
        return self.head in LAYER_OPS


def parse_op(op: str) -> Op:
    """The one parser of the ``ops`` mini-language (see the module docstring)."""
    head, _, rest = op.partition(":")
    if head in LAYER_OPS:
        layer, _, arg = rest.partition(":")
        return Op(head, layer, arg)
    return Op(head, "", rest)


def forward_layer_names(ops: Iterable[str], heads: Sequence[str] = LAYER_OPS) -> list[str]:
    """Names of the layers the forward applies, in order (with repeats), whose op head is
    in ``heads``."""
    return [o.layer for o in map(parse_op, ops) if o.applies_layer and o.head in heads]


def token_group(ops: Iterable[str]) -> int:
    """How many input tokens the forward concatenates into one (``merge_tokens``)."""
    group = 1
    for o in map(parse_op, ops):
        if o.head == "merge_tokens":
            group *= int(o.arg)
    return group


@dataclass
class Layer:
    name: str
    kind: LayerKind
    tensors: dict[str, torch.Tensor]
    keys: dict[str, str] = field(default_factory=dict)  # role -> original key in the source

    @property
    def weight(self) -> torch.Tensor:
        return self.tensors["weight"]

    @property
    def bias(self) -> torch.Tensor | None:
        return self.tensors.get("bias")


@dataclass
class Projector:
    family: str
    layers: list[Layer]
    ops: tuple[str, ...]
    source: str = ""
    sha256: str = ""
    files: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    # non-projector tensors of an adapter file (original key -> tensor), carried into merged
    # outputs and written back by the writers; not part of state() (see core.io.extras)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    # ----------------------------------------------------------------- structure
    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def state(self) -> dict[str, torch.Tensor]:
        """Canonical name -> tensor, in layer order."""
        return {f"{l.name}.{role}": t for l in self.layers for role, t in l.tensors.items()}

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        """Original checkpoint key -> tensor (falls back to canonical names)."""
        return {
            l.keys.get(role, f"{l.name}.{role}"): t for l in self.layers for role, t in l.tensors.items()
        }

    def signature(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(k, tuple(v.shape)) for k, v in self.state().items()]

    @property
    def dtype(self) -> torch.dtype:
        counts = Counter(t.dtype for t in self.state().values() if t.is_floating_point())
        return counts.most_common(1)[0][0] if counts else torch.float32

    @property
    def device(self) -> torch.device:
        for t in self.state().values():
            return t.device
        return torch.device("cpu")

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.state().values())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state().values())

    def linear_layers(self) -> list[Layer]:
        return [l for l in self.layers if l.kind == "linear"]

    @property
    def in_features(self) -> int:
        """Width of one input token (before any ``merge_tokens``)."""
        merge = 1
        for op in map(parse_op, self.ops):
            if op.head == "merge_tokens":
                merge *= int(op.arg)
            elif op.applies_layer:
                w = self.layer(op.layer).weight
                return int(w.shape[1] if op.head == "linear" else w.shape[0]) // merge
        raise ValueError("projector has no forward layers")

    @property
    def out_features(self) -> int:
        last_linear = [l for l in self._forward_layers() if l.kind == "linear"][-1]
        return int(last_linear.weight.shape[0])

    def _forward_layers(self) -> list[Layer]:
        return [self.layer(n) for n in forward_layer_names(self.ops)]

    def hidden_pairs(self) -> list[tuple[str, str]]:
        """(in_layer, out_layer) for every ``linear -> activation -> linear`` in the forward.

        Permuting the output units of ``in_layer`` and the input units of ``out_layer`` by
        the same permutation leaves the projector's function unchanged.
        """
        pairs: list[tuple[str, str]] = []
        ops = [parse_op(o) for o in self.ops]
        for a, act, b in zip(ops, ops[1:], ops[2:]):
            if a.head == "linear" and act.head in ACTIVATIONS and b.head == "linear":
                pairs.append((a.layer, b.layer))
        return pairs

    # ----------------------------------------------------------------- copies
    def with_state(self, state: Mapping[str, torch.Tensor], **changes: object) -> Projector:
        """Same structure and keys, new tensors (canonical names)."""
        layers = []
        for l in self.layers:
            tensors = {role: state[f"{l.name}.{role}"] for role in l.tensors}
            layers.append(Layer(l.name, l.kind, tensors, dict(l.keys)))
        if "metadata" not in changes:  # facts about the old values do not carry over
            changes["metadata"] = {
                k: v for k, v in self.metadata.items() if k not in ("finite_checked", "nonfinite_tensors")
            }
        return replace(self, layers=layers, **changes)  # type: ignore[arg-type]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Projector:
        def conv(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return self.with_state({k: conv(v) for k, v in self.state().items()})

    def clone(self) -> Projector:
        return self.with_state({k: v.clone() for k, v in self.state().items()})

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_inputs(x)[0]

    def forward_with_inputs(
        self, x: torch.Tensor, capture: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run the projector on ``x`` [..., in]; optionally return each layer's input."""
        inputs: dict[str, torch.Tensor] = {}
        saved: list[torch.Tensor] = []
        for op in self.ops:
            head, lname, arg = parse_op(op)
            if head in LAYER_OPS:
                layer = self.layer(lname)
                w = layer.weight.to(x.dtype)
                b = layer.bias.to(x.dtype) if layer.bias is not None else None
                if capture:
                    inputs[layer.name] = x
                if head == "linear":
                    x = F.linear(x, w, b)
                elif head == "layernorm":
                    eps = float(arg) if arg else 1e-5
                    x = F.layer_norm(x, (w.shape[0],), w, b, eps)
                else:
                    eps = float(arg) if arg else 1e-6
                    xf = x.float()
                    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
                    x = xf.to(x.dtype) * w
            elif head == "gelu":
                x = F.gelu(x)
            elif head == "gelu_tanh":
                x = F.gelu(x, approximate="tanh")
            elif head == "relu":
                x = F.relu(x)
            elif head == "silu":
                x = F.silu(x)
            elif head == "merge_tokens":
                n = int(arg)
                x = x.reshape(*x.shape[:-2], x.shape[-2] // n, n * x.shape[-1]) if x.dim() > 2 else x.reshape(-1, n * x.shape[-1])
            elif head == "push":
                saved.append(x)
            elif head == "add":
                x = x + saved.pop()
            else:  # pragma: no cover - families are data; an unknown op is a bug there
                raise ValueError(f"unknown projector op '{op}'")
        return x, inputs


def all_finite(t: torch.Tensor) -> bool:
    """True when a tensor has no NaN/Inf: exactly when its smallest and largest values are
    finite (min and max propagate NaN, and an Inf is the max or -Inf the min). One
    read-only pass in the tensor's own dtype, no overflow to rule out (a float32 sum of a
    bf16 tensor converts every entry first: 20x slower)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def nonfinite_tensors(projector: Projector) -> list[str]:
    """Canonical names of the tensors holding NaN or Inf."""
    return [k for k, t in projector.state().items() if not all_finite(t)]


def check_compatible(
    projectors: Sequence[Projector], names: Sequence[str] | None = None
) -> None:
    """Raise :class:`IncompatibleExperts` naming the expert, tensor and both shapes."""
    if not projectors:
        return
    names = list(names) if names is not None else [p.source or f"expert {i}" for i, p in enumerate(projectors)]
    for p, name in zip(projectors, names):  # zero-unit layers: refused once here, not per method
        empty = next(((k, s) for k, s in p.signature() if 0 in s), None)
        if empty is not None:
            raise MethodError(f"expert '{name}': tensor '{empty[0]}' has shape {list(empty[1])}, a layer "
                              "with no units (zero-size dimension): there is nothing to merge")
    ref, ref_name = projectors[0], names[0]
    ref_sig = dict(ref.signature())
    for p, name in zip(projectors[1:], names[1:]):
        sig = dict(p.signature())
        for key, shape in ref_sig.items():
            if key not in sig:
                raise IncompatibleExperts(name, key, "missing", ref_name, shape,
                                          f"families: {p.family} vs {ref.family}")
            if sig[key] != shape:
                raise IncompatibleExperts(name, key, sig[key], ref_name, shape)
        extra = [k for k in sig if k not in ref_sig]
        if extra:
            raise IncompatibleExperts(name, extra[0], sig[extra[0]], ref_name, "missing",
                                      f"families: {p.family} vs {ref.family}")
        if tuple(p.ops) != tuple(ref.ops):
            raise IncompatibleExperts(name, "<architecture>", "-", ref_name, "-",
                                      f"forward differs: {p.family} vs {ref.family}")


def mean_projector(projectors: Iterable[Projector]) -> Projector:
    """Element-wise mean in fp32 (used as the task-vector reference when no base is given)."""
    ps = list(projectors)
    state = {k: torch.stack([p.state()[k].float() for p in ps]).mean(0) for k in ps[0].state()}
    return ps[0].with_state(state, source="mean of experts", sha256="")
