"""mmdp: multimodal-guided dynamic dataset pruning on Ray.

The library behind ``jobs/``, one subpackage per step of the flow:
``data`` (read: the contract, shard readers, reference datasets and noise),
``score`` (CLIP consistency, the Ray Data job), ``prune`` (per-sample state,
policies, the pruning actor), ``train`` (the Ray Train loop and driver) and
``report``; ``storage`` (URLs and the commit protocol) and ``cli`` (the one
job skeleton) serve them all.
"""

__version__ = "0.1.0"
