"""The report of :func:`shardwise.verify`, and the comparisons that write it.

:class:`Judge` walks the reference's records in execution order, compares each with
the TP ranks' pieces (:mod:`shardwise.diagnostics.verify_record`), and turns the first difference
into a :class:`Divergence` that says where to look, in words.

Example::

    >>> print(result.first_divergence)
    step 0, forward: inputs of 'mlp.fc2' already differ (...) although 'mlp.fc1' matched: ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.distributed.tensor import Placement, Replicate, Shard

from .tolerance import excess, largest_magnitude
from .verify_record import Key, Piece, Record, assemble, compare

__all__ = ["Divergence", "Judge", "VerifyResult"]

# A tensor matches when every element is within rtol * (|ref| + scale) of the reference
# (the one model of diagnostics/tolerance.py). To name the first module that diverges, the
# scale is the tensor's own largest magnitude plus a FLOOR share of the phase's: enough for
# gradients that cancel to almost nothing (a key projection's bias: softmax ignores a
# constant shift of the scores), whose rounding error is that of the terms they were
# summed from, and tight enough that a small module's bug is not hidden by a large one's
# scale. (The test kit, which only asks "equal or not", uses the whole phase's scale.)
FLOOR = {
    "module inputs and outputs": 0.01,
    "output gradients": 0.1,
    "gradients": 0.1,
    "parameters after a step": 0.01,
}

Phase = Literal["forward", "backward", "step"]


@dataclass(frozen=True)
class Divergence:
    """Where the parallel copy first differs from the single-device one.

    ``fqn`` is the first module whose output differs while everything before it matched
    (for gradients and parameters, the module owning the parameter; ``""`` is the root).
    ``detail`` says what differs and where to look; ``hint`` adds what the layout
    suggests, when it suggests something.
    """

    fqn: str
    phase: Phase
    max_abs_diff: float
    detail: str
    step: int = 0
    what: str = "output"  # input, output, output gradient, gradient or parameter
    tolerance: float = 0.0
    hint: str = ""

    def __str__(self) -> str:
        text = f"step {self.step}, {self.phase}: {self.detail}."
        return f"{text}\n{self.hint}" if self.hint else text


@dataclass(frozen=True)
class VerifyResult:
    """What :func:`verify` found: ``ok``, and the ``first_divergence`` when not.

    ``compared`` counts the comparisons per phase; ``worst`` is the largest difference
    among those that matched, as a fraction of its tolerance.
    """

    tp_size: int
    steps: int
    first_divergence: Divergence | None = None
    compared: dict[str, int] = field(default_factory=dict)
    worst: float = 0.0
    worst_at: str = ""

    @property
    def ok(self) -> bool:
        """True when every compared tensor matched."""
        return self.first_divergence is None

    def __str__(self) -> str:
        counts = ", ".join(f"{n} {what}" for what, n in self.compared.items())
        if self.first_divergence is None:
            return (
                f"TP={self.tp_size} matches one device over {self.steps} step(s): {counts} "
                f"compared; the largest difference is {self.worst:.0%} of its tolerance "
                f"({self.worst_at})."
            )
        return f"TP={self.tp_size} differs from one device at {self.first_divergence}"


def _label(fqn: str) -> str:
    return f"'{fqn}'" if fqn else "the root module"


def _owner(name: str) -> str:
    return name.rpartition(".")[0]


def _layout_hint(layout: Placement | None, pieces: list[Piece]) -> str:
    if not isinstance(layout, Shard):
        return ""
    d = layout.dim
    sizes = [p.tensor.shape[d] for p in pieces if p.tensor is not None]
    return (
        f"On the TP ranks this tensor is split along dim {d} (the ranks hold {sizes} of "
        f"{sum(sizes)}): an op that reduces over that dim (softmax, a norm, a mean) or "
        "reshapes by its full size (a head count taken from the local width) sees only "
        "this rank's slice."
    )


@dataclass
class Judge:
    """Compares the ranks' gathered pieces with the reference and words the first divergence.

    Runs on the TP group's first rank only. Example::

        >>> found, root_layout = Judge(None, 3e-5, 1e-2, types).forward(ref_records, ranks)
    """

    atol: float | None  # the user's; None: rtol * (own scale + FLOOR[phase] * phase scale)
    rtol: float
    types: dict[str, str]  # module FQN -> class name, for messages
    step: int = 0
    scale: float = 0.0
    compared: dict[str, int] = field(default_factory=dict)
    worst: float = 0.0
    worst_at: str = ""

    def check(
        self, phase: str, what: str, ref: torch.Tensor, pieces: list[Piece]
    ) -> tuple[float, float, Placement | None]:
        """``(max |diff|, tolerance, layout)``; a diff above the tolerance is a divergence."""
        self.compared[phase] = self.compared.get(phase, 0) + 1
        candidates, layout = assemble(pieces, ref.shape)
        if not candidates:
            return float("inf"), 0.0, None
        own = largest_magnitude([ref])
        atol, scale = (0.0, own + FLOOR[phase] * self.scale) if self.atol is None else (self.atol, 0.0)
        atol, rtol = (atol, self.rtol) if ref.is_floating_point() else (0.0, 0.0)
        diff, tol, _ = compare(ref, candidates, atol, rtol, scale)
        if diff <= tol and tol > 0 and diff / tol >= self.worst:
            self.worst, self.worst_at = diff / tol, f"{what}, step {self.step}"
        return diff, tol, layout

    def forward(
        self, ref: list[Record], tp: list[dict[Key, Record]]
    ) -> tuple[Divergence | None, Placement | None]:
        """The first forward divergence, and the layout of the root output (for the loss)."""
        last_ok: Record | None = None
        layouts: dict[Key, tuple[Placement | None, list[Piece]]] = {}
        root: Placement | None = None
        self.scale = largest_magnitude([r.piece.tensor for r in ref if r.piece.tensor is not None])
        for rec in ref:
            if any(rec.key not in rank for rank in tp) or rec.piece.tensor is None:
                continue
            pieces = [rank[rec.key].piece for rank in tp]
            diff, tol, layout = self.check(
                "module inputs and outputs",
                f"{rec.key[0]} of {_label(rec.key[1])}",
                rec.piece.tensor,
                pieces,
            )
            layouts[rec.key] = (layout, pieces)
            if rec.key == ("output", "", 0):
                root = layout
            if diff <= tol:
                last_ok = rec
                continue
            return self._forward_divergence(rec, last_ok, diff, tol, pieces, layouts), None
        return None, root

    def _forward_divergence(
        self,
        rec: Record,
        last_ok: Record | None,
        diff: float,
        tol: float,
        pieces: list[Piece],
        layouts: dict[Key, tuple[Placement | None, list[Piece]]],
    ) -> Divergence:
        kind, fqn, n = rec.key
        size = f"(max |diff| {diff:.3g} > tolerance {tol:.3g})"
        shapes = [tuple(p.tensor.shape) for p in pieces if p.tensor is not None]
        if diff == float("inf") and tol == 0.0:
            size = f"(the ranks' pieces {shapes} fit no layout of shape {tuple(rec.piece.tensor.shape)})"  # type: ignore[union-attr]
        layout, hint_pieces = layouts.get(rec.key, (None, pieces))
        if kind == "input":
            if last_ok is None:
                text = (
                    f"the inputs of {_label(fqn)} differ {size} before any module matched: "
                    "verify feeds every rank the full single-device inputs"
                )
            elif last_ok.key[0] == "output":
                caller = rec.caller
                where = ""
                if caller is not None and caller == last_ok.caller:
                    where = f", in the forward of {_label(caller)} ({self.types.get(caller, '?')})"
                text = (
                    f"inputs of {_label(fqn)} already differ {size} although "
                    f"{_label(last_ok.key[1])} matched: look at the code between them{where}"
                )
            else:
                text = (
                    f"inputs of {_label(fqn)} already differ {size} although the inputs of "
                    f"{_label(last_ok.key[1])} matched: look at the code in its forward "
                    f"before it calls {_label(fqn)}"
                )
        else:
            layout, hint_pieces = layouts.get(("input", fqn, n), (None, pieces))
            if last_ok is not None and last_ok.key[0] == "output" and last_ok.key[1] != fqn:
                text = (
                    f"the output of {_label(fqn)} differs {size} although its input and its "
                    f"submodule {_label(last_ok.key[1])} matched: look at the code in its "
                    f"forward after it calls {_label(last_ok.key[1])}"
                )
            else:
                text = (
                    f"the output of {_label(fqn)} differs {size} although its input matched: "
                    f"look at {_label(fqn)} itself (its forward, or its plan entry)"
                )
        return Divergence(
            fqn, "forward", diff, text, self.step, kind, tol, _layout_hint(layout, hint_pieces)
        )

    def backward(
        self,
        ref_order: list[Record],
        ref_grads: dict[str, torch.Tensor | None],
        tp: list[dict[Key, Record]],
        tp_grads: list[dict[str, Piece]],
    ) -> Divergence | None:
        """The first divergence in the order autograd computed the reference's gradients."""
        seen = {r.key[1] for r in ref_order if r.key[0] == "gradient"}
        order = ref_order + [
            Record(("gradient", name, 0), Piece(None, None))
            for name in ref_grads
            if name not in seen
        ]
        last_ok = "the loss"
        matched: set[str] = set()  # modules whose output gradient matched
        self.scale = largest_magnitude(
            [r.piece.tensor for r in ref_order if r.piece.tensor is not None]
            + [g for g in ref_grads.values() if g is not None]
        )
        for rec in order:
            kind, name, _ = rec.key
            if kind == "gradient":
                ref = ref_grads.get(name)
                if any(name not in rank for rank in tp_grads):
                    continue  # replaced by the plan (a swapped module): nothing to compare
                pieces = [rank[name] for rank in tp_grads]
                if ref is None:
                    if any(p.tensor is not None for p in pieces):
                        return Divergence(
                            _owner(name),
                            "backward",
                            float("inf"),
                            f"parameter '{name}' gets a gradient on the TP ranks but "
                            "none on one device",
                            self.step,
                            "gradient",
                        )
                    continue
                diff, tol, _ = self.check("gradients", f"gradient of '{name}'", ref, pieces)
                apart = self._replicas_apart(name, pieces)
                if apart is not None and diff <= tol:
                    return apart  # each close to one device, but not to each other
                if diff > tol:
                    owner = _owner(name)
                    if owner in matched:
                        last_ok = f"the gradient arriving at the output of {_label(owner)}"
                    return self._grad_divergence(name, ref, pieces, diff, tol, last_ok)
                continue
            if rec.piece.tensor is None or any(rec.key not in rank for rank in tp):
                continue
            pieces = [rank[rec.key].piece for rank in tp]
            diff, tol, _ = self.check(
                "output gradients",
                f"gradient at the output of {_label(name)}",
                rec.piece.tensor,
                pieces,
            )
            if diff > tol:
                text = (
                    f"the gradient arriving at the output of {_label(name)} differs (max |diff| "
                    f"{diff:.3g} > tolerance {tol:.3g}) although {last_ok} matched: look at the "
                    f"backward of the code that consumes the output of {_label(name)} (a custom "
                    "autograd function, a detach, a collective without its backward)"
                )
                return Divergence(name, "backward", diff, text, self.step, kind, tol)
            last_ok = f"the gradient arriving at the output of {_label(name)}"
            matched.add(name)
        return None

    def _replicas_apart(self, name: str, pieces: list[Piece]) -> Divergence | None:
        """A replicated parameter whose gradient is not the same on every rank.

        Each rank then steps its copy differently and the copies train apart: silently,
        and visibly only after many steps, since each copy can be within tolerance of one
        device. Replicas compute (or all-reduce) the same gradient from the same values,
        so the bound is tight: the tolerance model at the gradient's own scale.
        """
        tensors = [p.tensor for p in pieces]
        replicated = all(p.placement is None or isinstance(p.placement, Replicate) for p in pieces)
        first = tensors[0]
        if not replicated or first is None or any(t is None or t.shape != first.shape for t in tensors):
            return None
        own = largest_magnitude([first])
        for rank, t in enumerate(tensors[1:], start=1):
            assert t is not None
            found = excess(t, first, tol=self.rtol, scale=own, equal_nan=True)
            if found.ok:
                continue
            owner = _owner(name)
            text = (
                f"replicated parameter '{name}' (in {_label(owner)}) gets a different gradient "
                f"on rank {rank} than on rank 0 (max |diff| {found.diff:.3g} > tolerance "
                f"{found.bound:.3g}), though each is close to one device's: each rank's "
                "optimizer step moves its copy differently, so the copies train apart"
            )
            hint = (
                "a replicated parameter applied to a sharded activation (a router, a norm "
                "fed a shard, a shared rotary slice) needs its gradient summed over the TP "
                f"group: give '{name}' a placement in the plan, or all-reduce its gradient."
            )
            return Divergence(owner, "backward", found.diff, text, self.step, "gradient", found.bound, hint)
        return None

    def _grad_divergence(
        self,
        name: str,
        ref: torch.Tensor,
        pieces: list[Piece],
        diff: float,
        tol: float,
        last_ok: str,
    ) -> Divergence:
        owner = _owner(name)
        text = (
            f"the gradient of parameter '{name}' (in {_label(owner)}) differs (max |diff| "
            f"{diff:.3g} > tolerance {tol:.3g}) although {last_ok} matched"
        )
        hint = ""
        plain = all(p.placement is None or isinstance(p.placement, Replicate) for p in pieces)
        tensors = [p.tensor for p in pieces if p.tensor is not None]
        if plain and len(tensors) == len(pieces) and all(t.shape == ref.shape for t in tensors):
            total, _, _ = compare(ref, [("sum", torch.stack(tensors).sum(0))], 0.0, 0.0)
            if total <= tol:
                text += (
                    ": it is a plain (replicated) tensor on the TP ranks and each rank holds "
                    "only its share of the gradient (the ranks' gradients sum to the "
                    "single-device one)"
                )
                hint = (
                    f"'{name}' is applied to a sharded activation, so its gradient needs a sum "
                    "over the TP group: give it a placement in the plan (shard it with the "
                    "activation), or all-reduce its gradient before the optimizer step."
                )
        if not hint:
            text += f": look at how {_label(owner)} uses '{name}' (its forward, or its plan entry)"
        return Divergence(owner, "backward", diff, text, self.step, "gradient", tol, hint)

    def params(self, ref: dict[str, torch.Tensor], tp: list[dict[str, Piece]]) -> Divergence | None:
        """The first parameter that differs after the optimizer step."""
        self.scale = largest_magnitude(list(ref.values()))
        for name, value in ref.items():
            if any(name not in rank for rank in tp):
                continue  # replaced by the plan (a swapped module): nothing to compare
            diff, tol, _ = self.check(
                "parameters after a step", f"parameter '{name}'", value, [rank[name] for rank in tp]
            )
            if diff > tol:
                text = (
                    f"parameter '{name}' differs after optimizer step {self.step + 1} (max |diff| "
                    f"{diff:.3g} > tolerance {tol:.3g}) although its gradient matched: look at "
                    "what runs between backward and the step (clipping, hooks, an optimizer "
                    "that treats it differently)"
                )
                return Divergence(_owner(name), "step", diff, text, self.step, "parameter", tol)
        return None
