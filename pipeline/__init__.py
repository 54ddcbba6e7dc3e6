"""mmdp: multimodal-guided dynamic dataset pruning on Ray.

The library behind the jobs in ``jobs/``: shard I/O (:mod:`pipeline.storage`), the
data contract (:mod:`pipeline.data.contract`), datasets, CLIP consistency scoring,
pruning policies and the Ray Data / Ray Train runners.
"""

__version__ = "0.1.0"
