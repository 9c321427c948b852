"""PLACEHOLDER: TensorParallelMultiheadAttention is being written."""
from __future__ import annotations
from typing import Any
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

class TensorParallelMultiheadAttention(nn.Module):
    def __init__(self, *a: Any, **k: Any) -> None:
        raise NotImplementedError

def check_attention(module: nn.Module, fqn: str, world: int) -> None:
    raise NotImplementedError

def parallelize_attention(module: nn.Module, mesh: DeviceMesh, style: Any) -> nn.Module:
    raise NotImplementedError
