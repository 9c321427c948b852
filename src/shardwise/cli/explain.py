"""``shardwise explain MODEL --tp N``: what a plan costs per rank, before launch.

MODEL is a local Hugging Face model directory or its ``config.json`` (the model is built
from the config on the meta device: no weights are read; the plan is
``shardwise.hf.auto_plan``), or ``package.module:function`` returning
``(model, plan, example_inputs)``.

Example::

    $ shardwise explain ./Llama-3-70B --tp 8 --seq 4096 --json
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["add_parser", "load", "run"]

DESCRIPTION = """\
Dry-run one training step of a tensor-parallel plan in this process, on the meta device,
over a fake process group (nothing is allocated or communicated), and print what each
rank holds and sends: parameters, gradients, optimizer states, activations saved for
backward, every all-reduce / all-gather / reduce-scatter of forward and backward with its
bytes, the planned modules with their shards, and warnings (large replicated parameters,
KV heads replicated, uneven shards)."""

EPILOG = """\
MODEL is one of:
  DIR or DIR/config.json   a Hugging Face model: built from its config on the meta device
                           (no weights read), planned with shardwise.hf.auto_plan, fed
                           input_ids of (--batch, --seq)
  package.module:function  a function returning (model, plan, example_inputs); inputs are
                           what one rank feeds (None: the Hugging Face default above)

examples:
  shardwise explain ./Meta-Llama-3-70B --tp 8 --seq 4096
  shardwise explain config.json --tp 4 --seq 2048 --batch 2 --dtype bfloat16 --json
  shardwise explain my_project.plans:llama_sp --tp 8"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``explain`` on the ``shardwise`` command's subparsers.

    Example::

        >>> add_parser(parser.add_subparsers())
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "explain",
        help="what a plan costs per rank (memory, collectives), before launch",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="HF directory or config.json, or module:function")
    parser.add_argument("--tp", type=int, required=True, metavar="N", help="tensor-parallel size")
    parser.add_argument(
        "--seq", type=int, metavar="L",
        help="sequence length of the default inputs (default: the config's max_position_embeddings)",
    )
    parser.add_argument("--batch", type=int, default=1, metavar="B", help="batch size (default 1)")
    parser.add_argument(
        "--dtype", metavar="DTYPE",
        help="parameter dtype, e.g. bfloat16 (default: the config's dtype, else the model's)",
    )
    parser.add_argument(
        "--optimizer", default="adamw", choices=["adamw", "adam", "sgd", "none"],
        help="optimizer states to count (adamw/adam: 2 per element; default adamw)",
    )
    parser.add_argument(
        "--no-vocab-parallel", action="store_true",
        help="HF models: leave the input embeddings replicated (default: vocabulary-parallel)",
    )
    parser.add_argument("--json", action="store_true", help="print report.to_dict() as JSON")
    parser.set_defaults(func=run)
    return parser


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    value = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise SystemExit(f"shardwise explain: --dtype {name!r} is not a torch dtype (e.g. bfloat16)")
    return value


def load(spec: str, tp: int, vocab_parallel: bool = True) -> tuple[Any, Any, Any, torch.dtype | None]:
    """``(model, plan, example_inputs, config dtype)`` for a MODEL argument.

    Example::

        >>> model, plan, inputs, dtype = load("config.json", tp=8)
    """
    path = Path(spec)
    if not path.exists() and ":" in spec:
        module_name, _, function = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), function)
        except (ImportError, AttributeError) as exc:
            raise SystemExit(f"shardwise explain: cannot load {spec!r}: {exc}") from exc
        result = factory()
        if not (isinstance(result, tuple) and len(result) == 3):
            raise SystemExit(
                f"shardwise explain: {spec} must return (model, plan, example_inputs), "
                f"got {type(result).__name__}"
            )
        model, plan, inputs = result
        return model, plan, inputs, None
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise SystemExit(
            f"shardwise explain: {spec!r} is neither a Hugging Face directory with a "
            "config.json, a config.json, nor package.module:function"
        )
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from ..hf import auto_plan

    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError:  # not a causal LM (BERT, ...)
            model = AutoModel.from_config(config)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    plan = auto_plan(model, tp_size=tp, vocab_parallel=vocab_parallel)
    return model, plan, None, dtype if isinstance(dtype, torch.dtype) else None


def run(args: argparse.Namespace) -> int:
    """Run ``shardwise explain`` with parsed ``args``; print the report; return 0.

    Example::

        >>> run(parser.parse_args(["explain", "config.json", "--tp", "8"]))
        0
    """
    from ..diagnostics.explain import explain

    if args.tp < 1:
        raise SystemExit(f"shardwise explain: --tp must be at least 1, got {args.tp}")
    model, plan, inputs, config_dtype = load(args.model, args.tp, not args.no_vocab_parallel)
    report = explain(
        model,
        plan,
        tp_size=args.tp,
        example_inputs=inputs,
        batch_size=args.batch,
        seq_len=args.seq,
        dtype=_dtype(args.dtype) or config_dtype,
        optimizer=None if args.optimizer == "none" else args.optimizer,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report, file=sys.stdout)
    return 0
