"""Data: the first step of read -> score -> prune -> train -> report.

The data contract every stage reads (``contract.py``: key, image, caption,
label, and how img2dataset's columns map onto it), the readers of the shard
files a dataset is stored in (``shards.py``; ``tars.py`` reads chosen samples
of a webdataset tar by byte range), row checks before scoring
(``validate.py``), and the reference datasets with their injected noise
(``reference.py``, ``noise.py``). Ray only in ``shards.read_shards``.
"""
