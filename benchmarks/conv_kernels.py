"""The native member-interleaved convolutions against PyTorch's grouped ones, per layer shape, and
builds of the kernels with other register tiles side by side (``--builds``).

Each shape is a stacked layer of the task loss or of generation: (members, in, out, kernel, stride,
images) on a 14 x 14 grid (7 x 7 for the 1x1 head conv). Forward + backward (input and weight
gradients), one thread, median of ``--rounds`` alternating rounds; the ratio is grouped / native.
A build is a comma-separated list of ``NAME=VALUE`` defines of ``member_conv.cpp`` (``""``: its
defaults for this machine), e.g. ``KT_VBYTES=64`` for the AVX-512-wide vectors on any machine.

    python benchmarks/conv_kernels.py --builds "" KT_VBYTES=64
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from kt_mlflow.blocks import native

SHAPES = [(32, 6, 3, 3, 1, 64), (32, 3, 6, 3, 2, 64), (32, 6, 6, 3, 1, 64), (32, 6, 12, 1, 1, 64),
          (16, 6, 6, 3, 1, 128), (16, 6, 6, 3, 2, 128)]


def _ms(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1000


def _build(defines: str) -> None:
    native.FLAGS = native.FLAGS[:5] + tuple("-D" + d for d in defines.split(",") if d)
    native.library.cache_clear()
    assert native.available(), f"the kernels did not build with {defines!r}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--builds", nargs="+", default=[""])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4)
    a = p.parse_args(argv)
    print("command: python benchmarks/conv_kernels.py " + shlex.join(sys.argv[1:]))
    torch.set_num_threads(1)
    cases = []
    for k, ci, co, kernel, s, b in SHAPES:
        size = 14 if kernel == 3 else 7
        x = torch.randn(b, k * ci, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
        w = torch.randn(k * co, ci, kernel, kernel, requires_grad=True)
        xi = native.interleave(x.detach(), k).requires_grad_()
        def grouped(x=x, w=w, k=k, s=s, kernel=kernel):
            return F.conv2d(x, w, None, s, kernel // 2, groups=k).sum().backward()
        def member(xi=xi, w=w, k=k, s=s):
            return native.member_conv2d(xi, w, k, s).sum().backward()
        cases.append(((k, ci, co, kernel, s, b), grouped, member))
    times = {name: [[] for _ in cases] for name in ["grouped", *a.builds]}
    for _ in range(a.rounds):
        for i, (_, grouped, _m) in enumerate(cases):
            grouped()
            times["grouped"][i].append(_ms(grouped, a.steps))
        for build in a.builds:
            _build(build)
            for i, (_, _g, member) in enumerate(cases):
                member()
                times[build][i].append(_ms(member, a.steps))
    print(f"{'members, in, out, kernel, stride, images':42s}" + "".join(f"{n or 'native':>22s}" for n in times))
    for i, (shape, *_) in enumerate(cases):
        base = statistics.median(times["grouped"][i])
        row = "".join(f"{statistics.median(t[i]):9.2f} ms ({base / statistics.median(t[i]):4.2f}x)" for t in times.values())
        print(f"{str(shape):42s}{row}")


if __name__ == "__main__":
    main()
