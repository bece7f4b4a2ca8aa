"""ResNet-18 forward+backward: native PyTorch vs the same model after gpuconv.torch.convert().

    python benchmarks/torch_resnet.py [--threads 2] [--batch 2] [--size 64] [--rounds 15]
                                      [--own-pool] [--wait-idle S]

Two copies of one model (same weights); rounds alternate native / gpuconv, the
first call after each switch is discarded (PyTorch's OpenMP threads keep
spinning after a call), the median of the rest is reported, with the ratio
native_time / gpuconv_time (>= 1 means gpuconv is faster) and the load average.
``--own-pool`` adds a third side: the converted model with gpuconv's CPU backend
left to its own worker threads and OpenBLAS's (the behaviour before the GEMMs
moved to PyTorch's pool), to show what the thread fight costs.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import gpuconv.torch as gt  # noqa: E402
from gpuconv import _bench  # noqa: E402


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


def resnet18(num_classes=10):
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
              nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


@contextlib.contextmanager
def _own_pool():
    saved = gt._cpu_threads
    gt._cpu_threads = contextlib.nullcontext
    try:
        yield
    finally:
        gt._cpu_threads = saved


def step(model, x):
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=4, help="timed calls per round and side")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="before each round wait up to S seconds for other processes to "
                         "leave the CPUs idle (< 10%%); the busy fractions are reported")
    ap.add_argument("--own-pool", action="store_true",
                    help="also time gpuconv with its own threads (no PyTorch GEMMs)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    native = resnet18().train()
    ours = gt.convert(copy.deepcopy(native))
    x = torch.randn(a.batch, 3, a.size, a.size)
    sides = [("native", native, contextlib.nullcontext), ("gpuconv", ours, contextlib.nullcontext)]
    if a.own_pool:
        sides.append(("own-pool", ours, _own_pool))
    times = {name: [] for name, _, _ in sides}
    for _, m, ctx in sides:
        with ctx():
            step(m, x)
    busy = []
    for _ in range(a.rounds):
        if a.wait_idle > 0:
            busy.append(_bench.wait_for_idle(a.wait_idle))
        for name, m, ctx in sides:
            with ctx():
                step(m, x)  # discarded: first call after the switch
                for _ in range(a.calls):
                    t0 = time.perf_counter()
                    step(m, x)
                    times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"ResNet-18 f32 forward+backward, batch {a.batch}, {a.size}x{a.size}, "
          f"torch {torch.__version__}, torch.get_num_threads()={torch.get_num_threads()}, "
          f"GPUCONV_NUM_THREADS={os.environ.get('GPUCONV_NUM_THREADS')}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"  native  {med['native']:8.1f} ms (median of {len(times['native'])})")
    print(f"  gpuconv {med['gpuconv']:8.1f} ms (median of {len(times['gpuconv'])})")
    if a.own_pool:
        print(f"  gpuconv, own threads {med['own-pool']:8.1f} ms (median of "
              f"{len(times['own-pool'])}), ratio native/own = "
              f"{med['native'] / med['own-pool']:.2f}")
    print(f"  speed ratio native/gpuconv = {med['native'] / med['gpuconv']:.2f}")
    print(f"  load average {os.getloadavg()}")
    if busy:
        print(f"  other processes' CPU use before each round: "
              f"{', '.join(f'{b:.2f}' for b in busy if b is not None)}")


if __name__ == "__main__":
    main()
