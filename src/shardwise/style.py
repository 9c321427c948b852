"""Parallel styles: how a module's parameters are sharded and how its input and output
are laid out.

Each style is a small value object; :func:`shardwise.parallelize_module` reads it and
does the work. The tables below state each style's contract on a TP mesh of size W.

===================  ======================  ======================  ==========================  ==========================
style                input (default)         output (default)        forward collective          backward collective
===================  ======================  ======================  ==========================  ==========================
ColwiseParallel      replicated              last-dim shard, local   none                        all-reduce of input grad
RowwiseParallel      last-dim shard, local   replicated, local       all-reduce                  none
PairwiseParallel     replicated              replicated, local       one all-reduce per pair     one all-reduce per pair
SequenceParallel     dim-0 shard, local      dim-0 shard, local      all-gather in, r-scatter    reduce-scatter in,
                                                                     out                         all-gather out
===================  ======================  ======================  ==========================  ==========================

ColwiseParallel and RowwiseParallel also take torch 2.x's keyword-only
``input_layouts``, ``output_layouts`` and ``use_local_output`` (and apply to
``nn.Embedding``); :mod:`shardwise.prepare` has ``PrepareModuleInput``/``Output``.

Example::

    >>> parallelize_module(mlp, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from torch import nn
from torch.distributed.tensor import Placement, Replicate, Shard

from .layouts import (
    ModuleIO,
    Role,
    as_placement,
    io_from_functions,
    make_input_replicate_1d,
    make_input_reshard_replicate,
    make_input_shard_1d,
    make_input_shard_1d_last_dim,
    make_output_replicate_1d,
    make_output_reshard_tensor,
    make_output_shard_1d,
    make_output_tensor,
    make_sharded_output_tensor,
)
from .sharded_embedding import check_embedding, embedding_placements, parallelize_embedding
from .sharded_linear import check_linear, linear_placements, parallelize_linear

__all__ = [
    "ColwiseParallel",
    "ModuleStyle",
    "PairwiseParallel",
    "ParallelStyle",
    "RowwiseParallel",
    "SequenceParallel",
    "make_input_replicate_1d",
    "make_input_reshard_replicate",
    "make_input_shard_1d",
    "make_input_shard_1d_last_dim",
    "make_output_replicate_1d",
    "make_output_reshard_tensor",
    "make_output_shard_1d",
    "make_output_tensor",
    "make_sharded_output_tensor",
]

PrepareFn = Callable[..., Any]


class ParallelStyle(ABC):
    """Base class of all styles: a pair of input/output preparation functions.

    ``_prepare_input(input, device_mesh)`` returns a DTensor in the layout the module
    expects; ``_prepare_output(output, device_mesh)`` turns the module's DTensor result
    into what the caller receives. Subclass it and call ``super().__init__(f, g)``.

    Example::

        >>> class MyStyle(PairwiseParallel): ...
    """

    _prepare_input: PrepareFn | None
    _prepare_output: PrepareFn | None

    @abstractmethod
    def __init__(
        self, _prepare_input: PrepareFn | None, _prepare_output: PrepareFn | None
    ) -> None:
        self._prepare_input = _prepare_input
        self._prepare_output = _prepare_output

    def __repr__(self) -> str:
        def name(fn: PrepareFn | None) -> str:
            return "None" if fn is None else getattr(fn, "__name__", repr(fn))

        return (
            f"{type(self).__name__}(_prepare_input={name(self._prepare_input)}, "
            f"_prepare_output={name(self._prepare_output)})"
        )


class ModuleStyle(ParallelStyle):
    """A style that validates and applies itself to one module (the extension point).

    Subclasses implement :meth:`check` (no communication: raise on anything that cannot
    work, the same way on every rank) and :meth:`apply` (shard parameters, install the
    forward; may communicate; returns the module to register in place of the old one).
    ``parallelize_module`` calls ``check`` for every plan entry before any ``apply``.
    An ``exclusive`` style (the default) owns the module's parameters, so no other plan
    entry may cover the same module; hook-only styles set ``exclusive = False``.

    Example::

        >>> class Replicated(ModuleStyle):
        ...     def check(self, module, fqn, mesh): ...
        ...     def apply(self, module, mesh): return module
    """

    exclusive: ClassVar[bool] = True

    def __init__(
        self, _prepare_input: PrepareFn | None = None, _prepare_output: PrepareFn | None = None
    ) -> None:
        super().__init__(_prepare_input, _prepare_output)

    def check(self, module: Any, fqn: str, mesh: Any) -> None:
        """Raise (without communicating) if this style cannot apply to ``module``."""

    @abstractmethod
    def apply(self, module: Any, mesh: Any) -> Any:
        """Parallelize ``module`` on the 1-D ``mesh``; return the module to register."""

    def param_placements(self, module: Any) -> Mapping[str, Placement] | None:
        """The placement :meth:`apply` gives each of ``module``'s own parameters.

        ``None`` (the default) means "not declared". ``parallelize_module`` uses it to
        keep a tied parameter (an embedding shared with the output head) one parameter:
        the tie is kept when every module holding it declares the same placement for it.

        Example::

            >>> ColwiseParallel().param_placements(nn.Linear(4, 8))
            {'weight': Shard(dim=0), 'bias': Shard(dim=0)}
        """
        return None


class _LinearLikeStyle(ModuleStyle):
    """Shared machinery of ColwiseParallel and RowwiseParallel (``nn.Linear``, ``nn.Embedding``)."""

    role: ClassVar[Role]

    def __init__(
        self,
        _prepare_input: PrepareFn | None,
        _prepare_output: PrepareFn | None,
        defaults: tuple[PrepareFn, PrepareFn],
        input_layouts: Placement | tuple[Placement] | None,
        output_layouts: Placement | tuple[Placement] | None,
        use_local_output: bool,
    ) -> None:
        name = type(self).__name__
        in_layout = as_placement(input_layouts, f"{name}(input_layouts=...)")
        out_layout = as_placement(output_layouts, f"{name}(output_layouts=...)")
        if not isinstance(use_local_output, bool):
            raise TypeError(
                f"{name}(use_local_output=...) must be a bool, got {use_local_output!r}"
            )
        self._layouts: ModuleIO | None = None
        if in_layout is not None or out_layout is not None or not use_local_output:
            if (_prepare_input, _prepare_output) != defaults:
                raise ValueError(
                    f"{name}: pass either the seed's _prepare_input/_prepare_output functions "
                    "or input_layouts/output_layouts/use_local_output, not both."
                )
            _prepare_input = _prepare_output = None  # unused: the layouts say it all
            default_in, default_out = (
                (Replicate(), Shard(-1)) if self.role == "colwise" else (Shard(-1), Replicate())
            )
            self._layouts = ModuleIO(
                in_layout or default_in, out_layout or default_out, use_local_output
            )
        super().__init__(_prepare_input, _prepare_output)

    def io(self) -> ModuleIO:
        """The input/output handling this style asks for, in placements.

        Example::

            >>> ColwiseParallel(input_layouts=Shard(1)).io().input_layout
            Shard(dim=1)
        """
        if self._layouts is not None:
            return self._layouts
        return io_from_functions(self.role, self._prepare_input, self._prepare_output)

    @property
    def input_layouts(self) -> tuple[Placement] | None:
        """``(placement,)`` of a plain input, as in torch 2.x (``None``: used as given)."""
        io = self.io()
        return None if io.input_fn is not None or io.input_layout is None else (io.input_layout,)

    @property
    def output_layouts(self) -> tuple[Placement]:
        """``(placement,)`` the output is redistributed to, as in torch 2.x."""
        return (self.io().output_layout,)

    @property
    def use_local_output(self) -> bool:
        """Whether the caller gets the local tensor (``True``) or the DTensor."""
        return self.io().use_local_output

    def check(self, module: Any, fqn: str, mesh: Any) -> None:
        """Raise (no communication) unless ``module`` is an unsharded Linear/Embedding that fits."""
        if isinstance(module, nn.Embedding):
            check_embedding(module, fqn, self.role, mesh.size())
        elif isinstance(module, nn.Linear):
            check_linear(module, fqn, self.role, mesh.size())
        else:
            raise RuntimeError(
                f"Expect a torch.nn.Linear or torch.nn.Embedding module but received "
                f"{type(module)}! ({type(self).__name__} on '{fqn or type(module).__name__}')"
            )

    def param_placements(self, module: Any) -> Mapping[str, Placement] | None:
        """``weight``/``bias`` placements on a Linear or Embedding (see :class:`ModuleStyle`)."""
        if isinstance(module, nn.Embedding):
            return embedding_placements(self.role)
        if isinstance(module, nn.Linear):
            return linear_placements(self.role)
        return None

    def apply(self, module: Any, mesh: Any) -> Any:
        """Shard ``module``'s parameters on ``mesh`` and install its local forward."""
        if isinstance(module, nn.Embedding):
            return parallelize_embedding(module, mesh, self.role, self.io())
        return parallelize_linear(module, mesh, self.role, self.io())

    def __repr__(self) -> str:
        if self._layouts is None:
            return super().__repr__()
        return (
            f"{type(self).__name__}(input_layouts={self.input_layouts}, "
            f"output_layouts={self.output_layouts}, use_local_output={self.use_local_output})"
        )


class RowwiseParallel(_LinearLikeStyle):
    """Shard an ``nn.Linear`` by rows of the math, or an ``nn.Embedding`` by vocabulary.

    ``nn.Linear``: ``weight`` ``Shard(1)`` (``in_features`` split), ``bias`` ``Replicate``.

    * Input: this rank's slice of the last (feature) dimension (``Shard(-1)``).
    * Output: the full result, identical on every rank, as a plain tensor (``Replicate``).
    * Forward: one all-reduce of the partial products (Megatron's *g*); bias added once.
    * Backward: no collective; the input gradient is this rank's feature slice.

    ``nn.Embedding``: ``weight`` ``Shard(0)`` (vocabulary split). Input: token ids,
    redistributed to ``Replicate`` (torch's default ``input_layouts`` is ``Shard(-1)``,
    which all-gathers ids along their last dim: pass ``input_layouts=Replicate()`` when
    every rank holds all ids). Each rank looks up its vocabulary slice, zeros elsewhere.
    Forward: one all-reduce. Backward: no collective.

    Keyword Args:
        input_layouts: layout of a plain input tensor (default ``Shard(-1)``).
        output_layouts: layout of the output: ``Replicate()`` (all-reduce), ``Shard(d)``
            (reduce-scatter on ``d``; backward all-gathers) or ``Partial()`` (none).
        use_local_output: return the local tensor (default) or the DTensor.

    The seed's positional ``_prepare_input``/``_prepare_output`` functions are still
    accepted (not together with the keywords). ``in_features`` (``num_embeddings``) that
    the mesh size does not divide is split like ``torch.chunk``.

    Example::

        >>> parallelize_module(model, mesh, {"fc2": RowwiseParallel()})
        >>> parallelize_module(model, mesh, {"tok": RowwiseParallel(input_layouts=Replicate(),
        ...                                                         output_layouts=Shard(1))})
    """

    role: ClassVar[Role] = "rowwise"

    def __init__(
        self,
        _prepare_input: PrepareFn | None = make_input_shard_1d_last_dim,
        _prepare_output: PrepareFn | None = make_output_tensor,
        *,
        input_layouts: Placement | tuple[Placement] | None = None,
        output_layouts: Placement | tuple[Placement] | None = None,
        use_local_output: bool = True,
    ) -> None:
        super().__init__(
            _prepare_input, _prepare_output, (make_input_shard_1d_last_dim, make_output_tensor),
            input_layouts, output_layouts, use_local_output,
        )


class ColwiseParallel(_LinearLikeStyle):
    """Shard an ``nn.Linear`` by output features, or an ``nn.Embedding`` by embedding dim.

    ``nn.Linear``: ``weight`` and ``bias`` ``Shard(0)`` (``out_features`` split).
    ``nn.Embedding``: ``weight`` ``Shard(1)``.

    * Input: replicated (every rank passes the same full tensor; ``Replicate``).
    * Output: this rank's slice of the last (feature) dimension, as a plain tensor (``Shard(-1)``).
    * Forward: no collective.
    * Backward: one all-reduce of the input gradient (Megatron's *f*); none for an Embedding.

    Keyword Args:
        input_layouts: layout of a plain input: ``Replicate()`` (default) or ``Shard(d)``,
            a sequence shard that is all-gathered on ``d`` (backward: reduce-scatter).
            Projections reading the same activation share one entry collective.
        output_layouts: ``Shard(-1)`` (default, no collective) or ``Replicate()``
            (all-gather of the last dim; backward: split).
        use_local_output: return the local tensor (default) or the DTensor.

    The seed's positional ``_prepare_input``/``_prepare_output`` functions are still
    accepted (not together with the keywords). ``out_features`` (``embedding_dim``) that
    the mesh size does not divide is split like ``torch.chunk``.

    Example::

        >>> parallelize_module(model, mesh, {"fc1": ColwiseParallel()})
        >>> parallelize_module(model, mesh, {"q": ColwiseParallel(input_layouts=Shard(1))})
    """

    role: ClassVar[Role] = "colwise"

    def __init__(
        self,
        _prepare_input: PrepareFn | None = make_input_replicate_1d,
        _prepare_output: PrepareFn | None = make_sharded_output_tensor,
        *,
        input_layouts: Placement | tuple[Placement] | None = None,
        output_layouts: Placement | tuple[Placement] | None = None,
        use_local_output: bool = True,
    ) -> None:
        super().__init__(
            _prepare_input, _prepare_output, (make_input_replicate_1d, make_sharded_output_tensor),
            input_layouts, output_layouts, use_local_output,
        )


class PairwiseParallel(ParallelStyle):
    """Colwise then Rowwise as a fixed pair, as in Megatron-LM (arXiv:1909.08053).

    Applies to an MLP with an even number of direct ``nn.Linear`` children (pairs in
    registration order), to ``nn.MultiheadAttention`` (swapped for
    :class:`~shardwise.multihead_attention_tp.TensorParallelMultiheadAttention`, heads
    split across ranks) and to ``nn.Transformer`` and its encoder/decoder layers (their
    feed-forward pairs).

    * Input: replicated. ``None`` means :func:`make_input_replicate_1d`, and is stored as it.
    * Output: replicated plain tensor. ``None`` means :func:`make_output_tensor`, stored as it.
    * Forward: one all-reduce per pair. Backward: one all-reduce per pair.

    Example::

        >>> model = parallelize_module(model, mesh, PairwiseParallel())
    """

    def __init__(
        self, _prepare_input: PrepareFn | None = None, _prepare_output: PrepareFn | None = None
    ) -> None:
        # The seed stores its defaults in place of ``None`` (SEMANTICS.md, section 2).
        super().__init__(
            make_input_replicate_1d if _prepare_input is None else _prepare_input,
            make_output_tensor if _prepare_output is None else _prepare_output,
        )

    def input_fn(self) -> PrepareFn:
        """The input function this style applies (``None`` resolved to its default).

        Example::

            >>> PairwiseParallel().input_fn() is make_input_replicate_1d
            True
        """
        return self._prepare_input or make_input_replicate_1d

    def output_fn(self) -> PrepareFn:
        """The output function this style applies (``None`` resolved to its default).

        Example::

            >>> PairwiseParallel().output_fn() is make_output_tensor
            True
        """
        return self._prepare_output or make_output_tensor


class SequenceParallel(PairwiseParallel):
    """PairwiseParallel with sequence-sharded input and output (arXiv:2205.05198).

    Every rank passes its own dim-0 slice (Megatron's ``[seq, batch, hidden]`` layout).

    * Input: this rank's dim-0 slice; all-gathered on entry.
    * Output: this rank's dim-0 slice of the result.
    * Forward: all-gather in, reduce-scatter out. Backward: reduce-scatter in, all-gather out.

    The result equals the single-device module applied to the concatenation of all
    ranks' inputs; parameter gradients are those of the sum of all ranks' losses.

    Example::

        >>> mlp = parallelize_module(mlp, mesh, SequenceParallel())
        >>> y_mine = mlp(x_mine)   # x_mine: [S/W, B, H]
    """

    def __init__(self) -> None:
        super().__init__(make_input_reshard_replicate, make_output_reshard_tensor)
