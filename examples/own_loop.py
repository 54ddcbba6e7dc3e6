"""Your own Ray Train loop, pruned by mmdp: your model, your loss, your optimiser.

The model here (a small MLP), its label-smoothed loss, AdamW and the decoding
are this script's own; the lines marked ``# mmdp`` are all that pruning adds.
Given a dataset in the mmdp layout and the score job's output for its train
split::

    python -m jobs.make_dataset --out runs/data --limit 8000 --noise symmetric:0.3
    python -m jobs.pretrain_reference_clip --data runs/data --out runs/ref-clip
    python -m jobs.score --input runs/data/train --output runs/scores --model mmdp-ref \
        --pretrained runs/ref-clip/model.pt --mode label
    python examples/own_loop.py --data runs/data --scores runs/scores --epochs 5

Prints each epoch's plan (kept samples, losses received) and training loss
(rank 0's) as JSON; the model is in the run's last checkpoint (``--out``).
Paths may be ``s3://`` or ``gs://`` URLs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile

import numpy as np
import ray
import ray.data
import ray.train
import torch
import torch.nn.functional as F
from PIL import Image
from ray.train.torch import TorchTrainer, prepare_model

from pipeline import storage
from pipeline.prune.policies import POLICIES
from pipeline.train.driver import POLL_INTERVAL_ENV, POLL_INTERVAL_S
from pipeline.train.pruning import Pruning  # mmdp

SIDE = 28


class MLP(torch.nn.Module):
    def __init__(self, classes: int, hidden: int = 128):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(SIDE * SIDE, hidden), torch.nn.GELU(),
                                       torch.nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)


def decode(batch: dict) -> dict:
    """Image bytes -> grey [n, 28, 28] floats; ``index`` and ``weight`` (from mmdp's stages) passed on."""
    pixels = [np.asarray(Image.open(io.BytesIO(b)).convert("L").resize((SIDE, SIDE)), np.float32) / 255
              for b in batch["image"]]
    x = np.stack(pixels) if pixels else np.zeros((0, SIDE, SIDE), np.float32)
    return {"x": x, "label": batch["label"].astype(np.int64), "index": batch["index"], "weight": batch["weight"]}


def loop(config: dict) -> None:
    pruning = config["pruning"]  # mmdp
    torch.manual_seed(config["seed"])
    model = prepare_model(MLP(config["classes"]))
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"])
    shard = ray.train.get_dataset_shard("train")
    history = []
    for epoch in range(config["epochs"]):
        pruning.start_epoch(epoch)  # mmdp: this epoch's plan, for every worker
        seen, loss_sum = 0, 0.0
        for batch in shard.iter_torch_batches(batch_size=config["batch_size"],
                                              dtypes={"x": torch.float32, "label": torch.int64,
                                                      "index": torch.int64, "weight": torch.float32}):
            losses = F.cross_entropy(model(batch["x"]), batch["label"], reduction="none", label_smoothing=0.1)
            opt.zero_grad()
            pruning.step_loss(losses, batch["weight"]).backward()  # mmdp: the plan's weights
            opt.step()
            pruning.report(batch["index"], losses.detach())  # mmdp: every sample's loss
            seen, loss_sum = seen + len(losses), loss_sum + float(losses.detach().sum())
        pruning.end_epoch()  # mmdp
        history.append({"epoch": epoch, "samples": seen, "train_loss": loss_sum / max(seen, 1)})
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if ray.train.get_context().get_world_rank() == 0:  # rank 0's model and figures reach the driver
                torch.save(model.state_dict(), os.path.join(tmp, "model.pt"))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({"history": history}, checkpoint=checkpoint)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset root: train/ shards and metadata.json")
    parser.add_argument("--scores", required=True, help="the score job's output for the train split")
    parser.add_argument("--out", default="runs/own-loop", help="Ray Train's run folder")
    parser.add_argument("--policy", default="mmdp", choices=tuple(POLICIES))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not ray.is_initialized():
        ray.init()
    classes = len(storage.read_json(storage.join(args.data, "metadata.json"))["classes"])
    pruning = Pruning.from_scores(args.scores, policy=args.policy, epochs=args.epochs, seed=args.seed)  # mmdp
    try:  # mmdp: from here on, the actor is stopped whatever fails
        fs, path = storage.filesystem_for(storage.join(args.data, "train"))
        train = pruning.dataset(ray.data.read_parquet(path, filesystem=fs)).map_batches(decode)  # mmdp: .dataset()
        out_fs, out_path = storage.filesystem_for(args.out)
        # Short epochs: Ray Train takes each report at its controller's poll (every 2 s by default), and a
        # worker's next report waits for it; Ray Train hands this setting from the driver to its processes.
        os.environ.setdefault(POLL_INTERVAL_ENV, POLL_INTERVAL_S)  # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, as jobs.train
        trainer = TorchTrainer(
            loop,
            train_loop_config={"pruning": pruning, "classes": classes, "epochs": args.epochs,  # mmdp: pruning
                               "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed},
            datasets={"train": train},
            # Half a CPU per worker leaves the data tasks that feed it a CPU on a small machine.
            scaling_config=ray.train.ScalingConfig(num_workers=args.workers, resources_per_worker={"CPU": 0.5}),
            run_config=ray.train.RunConfig(storage_path=out_path, storage_filesystem=out_fs),
        )
        result = trainer.fit()
        if result.error:
            raise result.error
        epochs = [{**row, **pruning.epoch_summary(row["epoch"])} for row in result.metrics["history"]]
        plans = pruning.plan_log()  # each epoch's plan, as jobs.train's plans.json has it
    finally:
        pruning.shutdown()  # mmdp: the actor holds the pool's state until it is stopped, a failed fit's too
    summary = {"policy": args.policy, "params": pruning.params, "num_samples": pruning.num_samples, "epochs": epochs,
               "plans": plans}
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
