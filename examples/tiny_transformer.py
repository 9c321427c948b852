"""A small single-device language model built from torch.nn Transformer layers.

Nothing here knows about parallelism; ``train_tp.py`` parallelizes it from outside.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyTransformerLM(nn.Module):
    """Embedding -> N pre-norm encoder layers (causal) -> LayerNorm -> vocabulary head."""

    def __init__(self, vocab: int = 64, d_model: int = 32, nhead: int = 4, layers: int = 2,
                 seq_len: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=4 * d_model, dropout=0.0,
                                       batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        mask = nn.Transformer.generate_square_subsequent_mask(seq_len)
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.embed(tokens) + self.pos[:t]          # [B, T, C]
        for layer in self.layers:
            x = layer(x, src_mask=self.causal_mask[:t, :t], is_causal=True)
        return self.head(self.norm(x))                  # [B, T, V]
