"""torch's optimizers on a parallelized model.

Example::

    >>> opt = torch.optim.AdamW(foreach_param_groups(model.parameters()), lr=1e-3, foreach=True)
"""

from .param_groups import foreach_param_groups

__all__ = ["foreach_param_groups"]
