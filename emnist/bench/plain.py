"""The baseline: a plain single-process numpy SGD loop, same model, data and hyper-parameters.

Run as ``python -m emnist.bench.plain CONFIG_JSON`` with one BLAS thread (the caller sets the
environment before numpy loads); prints one JSON record.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from emnist.data import open_shard, open_test, prepare_shards
from emnist.model import MLP, MLPShape, init_params, to_float
from emnist.train.config import TrainConfig
from emnist.train.downpour import batch_order


def plain_train(cfg: TrainConfig) -> dict:
    t_start = time.perf_counter()
    shard_dir = prepare_shards(cfg.dataset, cfg.dataset_dir, 1, cfg.shard_location, cfg.seed)
    shard, (test_x, test_y) = open_shard(shard_dir, 0), open_test(shard_dir)
    shape = MLPShape(cfg.pixels_per_image, cfg.hidden_size, shard.num_classes)
    params, model = init_params(shape, cfg.seed), MLP(shape, cfg.dropout_percent, cfg.seed + 1)
    rng = np.random.default_rng(cfg.seed + 1)
    alpha = np.float32(cfg.alpha)
    samples, train_s, acc, reached, epochs = 0, 0.0, 0.0, False, 0
    curve = []
    for epoch in range(1, cfg.iterations + 1):
        t0 = time.perf_counter()
        for at in batch_order(len(shard.y), cfg.batch_size, rng):
            _, grad = model.loss_and_grad(params, to_float(shard.x[at:at + cfg.batch_size]),
                                          shard.y[at:at + cfg.batch_size])
            grad *= -alpha
            params += grad
            samples += cfg.batch_size
        train_s += time.perf_counter() - t0
        acc, epochs = model.accuracy(params, test_x, test_y), epoch
        curve.append([round(time.perf_counter() - t_start, 4), epoch, acc])
        if acc >= cfg.target_accuracy:
            reached = True
            break
    return {"mode": "plain", "workers": 1, "samples_per_s_per_worker": samples / train_s,
            "seconds_to_target": time.perf_counter() - t_start, "accuracy": acc,
            "iterations": epochs, "reached": reached, "target_accuracy": cfg.target_accuracy,
            "curve": curve}


if __name__ == "__main__":
    print(json.dumps(plain_train(TrainConfig(**json.loads(sys.argv[1])))))
