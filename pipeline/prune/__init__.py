"""Prune: the third step of read -> score -> prune -> train -> report.

Per-sample state (loss moving average, consistency rank) in index-range
partitions, the policies that turn it into each epoch's plan (kept indices,
loss weights, a reason for every pruned sample), and the Ray actor the
training workers share it through (``actor.py``; ``remote.py`` puts the
partitions in actors of their own). Everything but those two is plain NumPy.
"""
