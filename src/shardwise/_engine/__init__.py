"""The engine: what runs inside a parallelized module's forward and backward.

Nothing here is public API; the public modules (``api``, ``style``, ``prepare``, ...)
decide *what* to shard, and these modules do it:

=====================  ==================================================================
``collectives``        the autograd-aware collectives (Megatron's f/g, gathers, scatters)
``redistribute``       one layout to another on local tensors, in at most one collective
``local_params``       DTensor parameters whose forward runs on local leaves
``grad_handoff``       local gradients handed to their DTensor parameters once per pass
``sharded_linear``     the column/row ``nn.Linear`` forwards
``entry_cache``        one entry collective per activation, shared by the layers reading it
``sharded_embedding``  the vocabulary/embedding-dim ``nn.Embedding`` forwards
``sequence_norm``      LayerNorm/RMSNorm on a sequence shard
``sequence_gather``    column layers that save a sequence shard and re-gather it in backward
``sized_gather``       gloo gathers that carry each rank's shape (uneven splits never abort)
``forward``            the one protocol of an installed forward (group, input/output layouts)
``torch_compat``       every private torch API the package uses, and why
=====================  ==================================================================
"""
