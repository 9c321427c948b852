"""The model, corpus and plan of ``shardwise train``: a character-level GPT on Python's own sources.

The model is plain single-device PyTorch (GPT blocks from :mod:`shardwise.testing.models`,
which take their head count from the local width); :func:`plan` parallelizes it from
outside: vocabulary-parallel input embedding, Megatron column/row pairs in every block,
and a column-parallel output head whose vocabulary-sharded logits go straight into
:func:`shardwise.vocab_parallel_cross_entropy`.

The corpus is the standard library's ``*.py`` files, which ship with every Python, read
as characters: newline and printable ASCII (96 symbols); anything else is dropped.

Example::

    >>> data = stdlib_corpus(max_chars=100_000)
    >>> model = CharLM(dim=128, heads=4, layers=2, seq=128)
    >>> model = parallelize_module(model, mesh, plan())
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import Replicate

from ..styles.linear import ColwiseParallel, RowwiseParallel
from ..testing.models import GPTBlock, gpt_block_plan

__all__ = ["VOCAB", "CharLM", "decode", "encode", "plan", "stdlib_corpus", "verify_case"]

VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))  # 96 symbols: a multiple of 2, 4, 8, 16, 32

_TABLE = torch.full((256,), -1, dtype=torch.long)
for _i, _c in enumerate(VOCAB):
    _TABLE[ord(_c)] = _i


def encode(text: str) -> torch.Tensor:
    """Token ids of ``text`` (characters outside :data:`VOCAB` dropped).

    Example::

        >>> encode("a\\n")
        tensor([66,  0])
    """
    data = bytearray(text.encode("ascii", "ignore"))
    if not data:
        return torch.zeros(0, dtype=torch.long)
    ids = _TABLE[torch.frombuffer(data, dtype=torch.uint8).long()]
    return ids[ids >= 0]


def decode(ids: torch.Tensor | list[int]) -> str:
    """The text of token ids."""
    return "".join(VOCAB[int(i)] for i in ids)


def stdlib_corpus(
    max_chars: int = 2_000_000, root: str | Path | None = None
) -> tuple[torch.Tensor, str]:
    """Token ids of the standard library's top-level ``*.py`` files, in name order.

    ``root`` overrides the folder (or names a single text file). Returns the ids and a
    description of the source for the log.

    Example::

        >>> ids, where = stdlib_corpus(max_chars=10_000)
        >>> ids.shape
        torch.Size([9891])
    """
    folder = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    files = [folder] if folder.is_file() else sorted(folder.glob("*.py"))
    chunks, total = [], 0
    for path in files:
        try:
            ids = encode(path.read_text(encoding="utf-8", errors="ignore"))
        except OSError:
            continue
        chunks.append(ids[: max_chars - total])
        total += len(chunks[-1])
        if total >= max_chars:
            break
    if total < 10_000:
        raise FileNotFoundError(
            f"found only {total} characters of Python source under {folder}; pass --corpus "
            "with a text file or a folder of .py files"
        )
    return torch.cat(chunks), f"{total / 1e6:.1f}M characters of {len(chunks)} files in {folder}"


class CharLM(nn.Module):
    """Token and position embeddings, ``layers`` GPT blocks, final LayerNorm, vocabulary head."""

    def __init__(
        self, dim: int, heads: int, layers: int, seq: int, vocab: int = len(VOCAB)
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(GPTBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        for name, p in self.named_parameters():  # GPT-2's initialisation, residual outputs scaled
            if p.dim() == 2:
                std = (
                    0.02 / (2 * layers) ** 0.5
                    if name.endswith(("o.weight", "down.weight"))
                    else 0.02
                )
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))  # [B, T, C]
        x = x.transpose(0, 1)  # [T, B, C]: GPTBlock is sequence-first
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).transpose(0, 1))  # [B, T, V]


def plan() -> dict[str, Any]:
    """The TP plan: vocabulary-parallel embedding, Megatron blocks, vocabulary-sharded logits.

    The head returns a DTensor ``Shard(-1)`` (``use_local_output=False``), the input
    :func:`~shardwise.vocab_parallel_cross_entropy` takes. Position embeddings and
    norms stay replicated.

    Example::

        >>> parallelize_module(CharLM(128, 4, 2, 128), mesh, plan())
    """
    return {
        "tok": RowwiseParallel(input_layouts=Replicate()),  # every rank gets all token ids
        "blocks.*": gpt_block_plan(),
        "head": ColwiseParallel(use_local_output=False),
    }


def verify_case() -> tuple[nn.Module, dict[str, Any], torch.Tensor]:
    """A small CharLM, its plan and a batch, for ``shardwise verify shardwise.cli.charlm:verify_case``."""
    torch.manual_seed(0)
    ids = torch.randint(0, len(VOCAB), (2, 16), generator=torch.Generator().manual_seed(1))
    return CharLM(dim=32, heads=4, layers=2, seq=16), plan(), ids
