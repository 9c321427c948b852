"""Checkpoints that reshard: save at one tensor-parallel size, load at another.

=====================  ============================================================
``sharded``            :func:`save_checkpoint` / :func:`load_checkpoint`: DCP directories
                       (model and optimizer) that load at any TP size, or unparallelized
``full``               :func:`export_full_state_dict`, :func:`save_full_state_dict`,
                       :func:`load_full_state_dict`: one single-device file
``files``              atomic publish (one ``renameat2`` exchange), fsync, removal
``safe_dcp``           DCP reads that run no code (allowlisted ``.metadata``, weights-only)
``integrity``          CRC-32 manifests and in-file checksums, verified on load
=====================  ============================================================

Every function here is collective over the default process group when one is
initialized: call it on every rank.

Example::

    >>> save_checkpoint("ckpt/step_100", model, optimizer, extra={"step": 100})
    >>> extra = load_checkpoint("ckpt/step_100", model, optimizer)   # any TP size
    >>> save_full_state_dict(model, "model.safetensors")
"""

from .full import export_full_state_dict, load_full_state_dict, save_full_state_dict
from .sharded import load_checkpoint, save_checkpoint

__all__ = [
    "export_full_state_dict",
    "load_checkpoint",
    "load_full_state_dict",
    "save_checkpoint",
    "save_full_state_dict",
]
