"""What a user would pick instead of emnist: torch DistributedDataParallel, gloo on loopback.

``ddp_train(cfg, processes)`` spawns ``processes`` ranks (the ``spawn`` start method, one
intra-op thread each). Each trains the same architecture from the run's initial vector on its
own shard of the same ``processes``-way shard set emnist's workers use, with the same
per-process batch and learning rate (``torch.optim.SGD``; DDP averages the gradients every
step). After each pass rank 0 evaluates on the test set and all ranks stop together once it
reaches the target. Time to target counts from the ranks' first barrier (process start and
imports excluded, as emnist's warm replicas have them done); ``wall_seconds`` includes them.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from emnist.train.config import TrainConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, cfg_json: str, out: str) -> None:
    os.environ.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from emnist.bench.plain import torch_accuracy, torch_epoch, torch_net
    from emnist.data import open_shard, open_test, prepare_shards
    from emnist.train.downpour import batch_order

    torch.set_num_threads(1)
    cfg = TrainConfig(**json.loads(cfg_json))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        shard_dir = prepare_shards(cfg.dataset, cfg.dataset_dir, world, cfg.shard_location,
                                   cfg.seed)
        shard = open_shard(shard_dir, rank)
        test = open_test(shard_dir) if rank == 0 else None
        spec = cfg.model_spec(shard.num_classes, shard.image_shape)
        net, model = torch_net(spec, cfg.seed)  # the same initial vector on every rank
        ddp = DDP(net)
        opt = torch.optim.SGD(ddp.parameters(), lr=cfg.alpha)
        bs = cfg.batch_size
        n = torch.tensor([len(shard.y) // bs])
        dist.all_reduce(n, op=dist.ReduceOp.MIN)  # lockstep: the same steps on every rank
        steps = max(1, int(n))
        dist.barrier()
        t_start = time.perf_counter()
        samples, train_s, acc, epochs, reached, curve = 0, 0.0, 0.0, 0, False, []
        for epoch in range(1, cfg.iterations + 1):
            rng = np.random.default_rng([cfg.seed, rank, epoch])
            t0 = time.perf_counter()
            samples += torch_epoch(ddp, model, opt, shard,
                                   batch_order(len(shard.y), bs, rng)[:steps], bs)
            train_s += time.perf_counter() - t0
            epochs = epoch
            flag = torch.zeros(1)
            if rank == 0:
                acc = torch_accuracy(net, model, *test)
                curve.append([round(time.perf_counter() - t_start, 4), epoch, acc])
                flag[0] = float(acc >= cfg.target_accuracy)
            dist.broadcast(flag, 0)
            if flag.item():
                reached = True
                break
        record = {"rank": rank, "samples": samples, "train_s": train_s,
                  "seconds": time.perf_counter() - t_start, "accuracy": acc,
                  "iterations": epochs, "reached": reached, "curve": curve,
                  "params": model.num_params, "threads": torch.get_num_threads()}
        Path(out, f"rank-{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def ddp_train(cfg: TrainConfig, processes: int = 2) -> dict[str, Any]:
    """One DDP run; a record shaped like the plain loop's and emnist's."""
    import torch.multiprocessing as mp

    wall = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(processes, _free_port(), json.dumps(cfg.to_dict()), out),
                           nprocs=processes, join=True, start_method="spawn")
        ranks = [json.loads(Path(out, f"rank-{r}.json").read_text()) for r in range(processes)]
    r0 = ranks[0]
    return {"mode": "ddp", "workers": processes, "model": cfg.model, "params": r0["params"],
            "samples_per_s_per_worker": float(np.mean([r["samples"] / r["train_s"]
                                                       for r in ranks])),
            "seconds_to_target": max(r["seconds"] for r in ranks),
            "wall_seconds": time.perf_counter() - wall, "target_accuracy": cfg.target_accuracy,
            "accuracy": r0["accuracy"], "iterations": r0["iterations"],
            "reached": r0["reached"], "threads": r0["threads"], "curve": r0["curve"]}


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    print(json.dumps(ddp_train(TrainConfig(**args["config"]), args.get("processes", 2))))
