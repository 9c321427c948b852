"""torch's optimizers on a parallelized model.

A parallelized model holds DTensor parameters (what shardwise sharded or replicated)
next to plain ones (modules the plan left alone), and torch's optimizers keep DTensor
state for the DTensor ones, so ``state_dict``, DCP and resharding see the global
picture. Two helpers make torch's own optimizers fast on such a model:

- :func:`step_on_local_shards` gives an SGD, Adam or AdamW a step that runs torch's own
  update on each DTensor's local tensor, bit for bit the update torch's step computes,
  without DTensor's per-op dispatch (:mod:`shardwise.optim.local_step`).
- :func:`foreach_param_groups` splits parameter groups by kind, so that torch's own
  step can take ``foreach=True`` (:mod:`shardwise.optim.param_groups`).

Example::

    >>> opt = step_on_local_shards(torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True))
"""

from .local_step import step_on_local_shards
from .param_groups import foreach_param_groups

__all__ = ["foreach_param_groups", "step_on_local_shards"]
