"""Train: a model on Ray Train, on each epoch's plan, reporting every sample's loss back.

``pruning`` is the public API a training loop uses (the pruning actor, each
epoch's planned dataset, loss reports: ``jobs.train``'s loop and users'
own); ``driver`` sets up the TorchTrainer (datasets, the pruning actor, the run
folder); ``stages`` are the training data's Ray Data stages (index, keep the
plan's rows, decode and augment); ``tar_reads`` the read of webdataset
tars that fetches only the kept samples' bytes; ``loop`` is the worker loop (weighted
per-sample losses, the schedule, evaluation, checkpoints); ``models`` the
image models. Reads ``score``'s output and drives ``prune``'s actor.
"""
