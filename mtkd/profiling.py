"""Size and speed of a network on this machine: parameters, multiply-accumulates, CPU latency at
batch 1 (with the process's threads, and on one thread) and throughput at batch 32. Shared by
``mtkd report`` and ``mtkd demo`` so that the teacher and the student are always measured the
same way."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mtkd.models.multitask import count_parameters

#: batch size of the throughput measurement
THROUGHPUT_BATCH = 32


@dataclass(frozen=True)
class Profile:
    parameters: int
    #: multiply-accumulates for one image (FLOPs / 2)
    macs: int
    #: batch 1 with ``threads`` intra-op threads
    latency_ms: float
    #: batch 1 on one thread, the usual way to serve one request per core on a CPU: a small
    #: network's hundreds of tiny operators gain nothing from more threads, only their
    #: synchronisation (the demo's student: 33.5 ms on 2 threads, 9.2 on one)
    latency_one_thread_ms: float
    throughput: float
    image_size: int
    threads: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def count_macs(net: nn.Module, image_size: int) -> int:
    """Multiply-accumulates of one forward pass on one image (FlopCounterMode counts 2 per MAC)."""
    image = torch.zeros(1, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        net(image)
    return counter.get_total_flops() // 2


def median_seconds(net: nn.Module, batch: int, image_size: int, repeats: int, warmup: int) -> float:
    """Median wall time of one forward pass on a random batch, after ``warmup`` untimed passes
    (the first ones pay for allocation and kernel selection)."""
    image = torch.randn(batch, 3, image_size, image_size)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            net(image)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_net(net: nn.Module, image_size: int, repeats: int = 5, warmup: int = 2) -> Profile:
    """Measure ``net`` in eval mode on the CPU with the current ``torch.get_num_threads()``, and
    its batch-1 latency on one thread too."""
    net = net.eval().cpu()
    threads = torch.get_num_threads()
    latency = median_seconds(net, 1, image_size, repeats, warmup)
    batch = median_seconds(net, THROUGHPUT_BATCH, image_size, repeats, warmup)
    torch.set_num_threads(1)
    try:
        one_thread = median_seconds(net, 1, image_size, repeats, warmup)
    finally:
        torch.set_num_threads(threads)
    return Profile(
        parameters=count_parameters(net),
        macs=count_macs(net, image_size),
        latency_ms=latency * 1000.0,
        latency_one_thread_ms=one_thread * 1000.0,
        throughput=THROUGHPUT_BATCH / batch,
        image_size=image_size,
        threads=threads,
    )
