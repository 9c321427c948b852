"""The report :func:`shardwise.explain` returns: ``to_dict()`` for tools, ``str()`` for people.

Example::

    >>> print(report)               # tables, layers folded by name pattern
    >>> json.dumps(report.to_dict())
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ExplainReport", "pattern"]

_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)")


def pattern(fqn: str) -> str:
    """``fqn`` with its numeric atoms (layer indices) replaced by ``*``.

    Example::

        >>> pattern("model.layers.17.mlp.up_proj")
        'model.layers.*.mlp.up_proj'
    """
    return _INDEX.sub("*", fqn)


def _bytes(n: int) -> str:
    """``n`` bytes in binary units, switching unit at 1000 so no figure has four digits."""
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1000 or unit == "TiB":
            break
    return f"{value:.2f} {unit}"


def _table(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [
            c.rjust(w) if c[:1].isdigit() and i else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths))
        ]
        return (indent + "  ".join(parts)).rstrip()

    rule = indent + "  ".join("-" * w for w in widths)
    return [line(header), rule, *(line(r) for r in rows)]


def _copy(collectives: dict[str, dict[str, dict[str, int]]] | None) -> Any:
    if collectives is None:
        return None
    return {phase: {kind: dict(v) for kind, v in kinds.items()} for phase, kinds in collectives.items()}


def _collective_table(collectives: dict[str, dict[str, dict[str, int]]]) -> list[str]:
    rows = [
        [phase, kind, str(v["count"]), f"{v['bytes']:,}", _bytes(v["bytes"])]
        for phase, kinds in collectives.items()
        for kind, v in kinds.items()
    ]
    return _table(["phase", "collective", "count", "bytes", ""], rows)


@dataclass
class ExplainReport:
    """What one training step of a plan costs per rank (see :func:`shardwise.explain`).

    Example::

        >>> report.params_per_rank, report.memory_per_rank["total"]
    """

    tp_size: int
    params_total: int
    params_per_rank: int
    memory_per_rank: dict[str, int]
    collectives: dict[str, dict[str, dict[str, int]]]
    modules: list[dict[str, Any]]
    warnings: list[str]
    inputs: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    optimizer: str | None = "adamw"
    backend: str = "nccl"
    # The first step's collectives where they differ from the steady state's (gloo's
    # sequence-parallel gathers agree on their capacity once); None: every step alike.
    first_step_collectives: dict[str, dict[str, dict[str, int]]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data: ``tp_size``, ``params_total``, ``params_per_rank``,
        ``memory_per_rank``, ``collectives`` (a step in steady state),
        ``first_step_collectives`` (``None`` when every step is alike), ``modules``,
        ``warnings``, ``inputs``, ``dtype``, ``optimizer``, ``backend``.

        Example::

            >>> report.to_dict()["collectives"]["backward"]["all_reduce"]   # Llama-3-70B, TP 8
            {'count': 161, 'bytes': 10804527104}
        """
        return {
            "tp_size": self.tp_size,
            "params_total": self.params_total,
            "params_per_rank": self.params_per_rank,
            "memory_per_rank": dict(self.memory_per_rank),
            "collectives": _copy(self.collectives),
            "modules": [
                {**row, "params": {n: dict(p) for n, p in row["params"].items()}}
                for row in self.modules
            ],
            "warnings": list(self.warnings),
            "inputs": dict(self.inputs),
            "dtype": self.dtype,
            "optimizer": self.optimizer,
            "backend": self.backend,
            "first_step_collectives": _copy(self.first_step_collectives),
        }

    def _module_rows(self) -> list[list[str]]:
        folded: dict[tuple[str, ...], int] = {}
        for row in self.modules:
            params = row["params"] or {"": None}
            for name, p in params.items():
                key = (
                    pattern(row["fqn"]) or "(root)",
                    row["style"],
                    name,
                    "" if p is None else ", ".join(p["placements"]),
                    "" if p is None else str(p["global_shape"]),
                    "" if p is None else str(p["local_shape"]),
                )
                folded[key] = folded.get(key, 0) + 1
        return [[k[0], f"x{n}" if n > 1 else "", *k[1:]] for k, n in folded.items()]

    def __str__(self) -> str:
        inputs = ", ".join(
            f"{name} {v['shape']} {v['dtype']}" for name, v in self.inputs.items()
        )
        share = self.params_per_rank / self.params_total if self.params_total else 0.0
        lines = [
            f"shardwise.explain: TP {self.tp_size}, one training step"
            + (f" on {inputs}" if inputs else "")
            + (f", {self.dtype}" if self.dtype else "")
            + f", optimizer {self.optimizer or 'none'}",
            f"parameters: {self.params_total:,} in all, {self.params_per_rank:,} on the most "
            f"loaded rank ({share:.2%})",
            "",
            "memory per rank",
        ]
        labels = {
            "parameters": "parameters",
            "gradients": "gradients",
            "optimizer_states": "optimizer states",
            "activations": "activations (saved for backward)",
            "total": "total",
        }
        lines += _table(
            ["", "bytes", ""],
            [[labels[k], f"{v:,}", _bytes(v)] for k, v in self.memory_per_rank.items()],
        )
        wire = "NCCL-tests sizes" if self.backend == "nccl" else "gloo, headers and padding included"
        steady = "per step" if self.first_step_collectives is None else "per step in steady state"
        lines += ["", f"collectives per rank {steady} ({wire})"]
        lines += _collective_table(self.collectives)
        if self.first_step_collectives is not None:
            lines += ["", "collectives of the first step (gloo agrees on gather capacities once)"]
            lines += _collective_table(self.first_step_collectives)
        lines += ["", f"planned modules ({len(self.modules)})"]
        lines += _table(
            ["module", "", "style", "param", "placements", "global shape", "local shape (rank 0)"],
            self._module_rows(),
        )
        lines += ["", "warnings" if self.warnings else "warnings: none"]
        lines += [f"  - {w}" for w in self.warnings]
        return "\n".join(lines)
