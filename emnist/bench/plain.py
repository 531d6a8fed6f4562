"""The baseline: a plain single-process SGD loop, same model, data and hyper-parameters.

The MLP's is the numpy loop it always was. A torch model's is what a user would write: the
same architecture as an ordinary ``nn.Module`` (its own parameters, started from the run's
initial vector), ``torch.optim.SGD``, batch norm with PyTorch's running statistics, one
intra-op thread. Run as ``python -m emnist.bench.plain CONFIG_JSON`` (the caller sets one
BLAS/OpenMP thread in the environment before numpy and torch load); prints one JSON record.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np

from emnist.data import open_shard, open_test, prepare_shards
from emnist.model import MLP, MLPShape, init_params, to_float
from emnist.models import ModelSpec, build_model
from emnist.train.config import TrainConfig
from emnist.train.downpour import batch_order


def plain_train(cfg: TrainConfig) -> dict[str, Any]:
    t_start = time.perf_counter()
    shard_dir = prepare_shards(cfg.dataset, cfg.dataset_dir, 1, cfg.shard_location, cfg.seed)
    shard, test = open_shard(shard_dir, 0), open_test(shard_dir)
    spec = cfg.model_spec(shard.num_classes, shard.image_shape)
    loop = _mlp_loop if spec.name == "mlp" else _torch_loop
    out = loop(cfg, spec, shard, test, t_start)
    return {"mode": "plain", "workers": 1, "model": spec.name, **out,
            "target_accuracy": cfg.target_accuracy}


def _record(samples: int, train_s: float, t_start: float, acc: float, epochs: int,
            reached: bool, curve: list, params: int) -> dict[str, Any]:
    return {"params": params, "samples_per_s_per_worker": samples / train_s,
            "seconds_to_target": time.perf_counter() - t_start, "accuracy": acc,
            "iterations": epochs, "reached": reached, "curve": curve}


def _mlp_loop(cfg: TrainConfig, spec: ModelSpec, shard: Any, test: tuple, t_start: float
              ) -> dict[str, Any]:
    test_x, test_y = test
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
    return _record(samples, train_s, t_start, acc, epochs, reached, curve, shape.num_params)


def torch_net(spec: ModelSpec, seed: int) -> tuple[Any, Any]:
    """(an ordinary nn.Module of ``spec``'s architecture holding the run's initial vector for
    ``seed``, the emnist model used to prepare its inputs)."""
    import torch

    from emnist.models.torch_nets import ARCHITECTURES, input_pad

    model = build_model(spec, seed=seed)
    flat = model.init_params(seed)
    cls = ARCHITECTURES[spec.name]
    side = spec.height + 2 * input_pad(spec.name, spec.height)
    kw = {"side": side} if spec.name == "cnn" else {}
    net = cls(spec.channels, spec.classes, spec.dropout, torch.Generator(), **kw)
    torch.nn.utils.vector_to_parameters(torch.from_numpy(flat.copy()), net.parameters())
    return net, model


def torch_accuracy(net: Any, model: Any, x: np.ndarray, y: np.ndarray,
                   batch: int = 256) -> float:
    import torch

    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            z = net(torch.from_numpy(model.prepare(x[i:i + batch])))
            correct += int((z.argmax(dim=1).numpy() == y[i:i + batch]).sum())
    net.train()
    return correct / max(len(y), 1)


def torch_epoch(net: Any, model: Any, opt: Any, shard: Any, order: Any, bs: int) -> int:
    """One pass of the ordinary torch loop (zero_grad, cross-entropy, backward, step) over the
    minibatches starting at ``order``; the samples it trained on. The plain baseline and DDP
    both train this way."""
    import torch
    import torch.nn.functional as F

    samples = 0
    for at in order:
        x = torch.from_numpy(model.prepare(shard.x[at:at + bs]))
        y = torch.from_numpy(shard.y[at:at + bs].astype(np.int64))
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        samples += bs
    return samples


def _torch_loop(cfg: TrainConfig, spec: ModelSpec, shard: Any, test: tuple, t_start: float
                ) -> dict[str, Any]:
    import torch

    from emnist.models.torch_backend import configure_threads

    configure_threads()
    net, model = torch_net(spec, cfg.seed)
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=cfg.alpha)
    rng = np.random.default_rng(cfg.seed + 1)
    bs = cfg.batch_size
    samples, train_s, acc, reached, epochs = 0, 0.0, 0.0, False, 0
    curve = []
    for epoch in range(1, cfg.iterations + 1):
        t0 = time.perf_counter()
        samples += torch_epoch(net, model, opt, shard, batch_order(len(shard.y), bs, rng), bs)
        train_s += time.perf_counter() - t0
        acc, epochs = torch_accuracy(net, model, *test), epoch
        curve.append([round(time.perf_counter() - t_start, 4), epoch, acc])
        if acc >= cfg.target_accuracy:
            reached = True
            break
    out = _record(samples, train_s, t_start, acc, epochs, reached, curve, model.num_params)
    return {**out, "threads": torch.get_num_threads()}


if __name__ == "__main__":
    print(json.dumps(plain_train(TrainConfig(**json.loads(sys.argv[1])))))
