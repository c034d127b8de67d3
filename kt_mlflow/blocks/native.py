"""Native CPU convolutions for stacked networks with members interleaved (``member_conv.cpp``).

The stacked layers normally keep each member's channels together (``(B, members*C, H, W)``, member
major) and run grouped convolutions. On a CPU, oneDNN pads each member's few channels (6 here) to a
16-channel block, so most of its arithmetic is on padding. Interleaving the members instead (channel
``c * members + m``; in channels-last memory the member is the innermost axis) lets one SIMD vector
hold the same channel of 8 (AVX2) or 16 (AVX-512) networks, and every multiply-add is useful.
``member_conv2d_max_pool`` also fuses the first block's convolution with its max-pooling, so the
batch's full-resolution output never exists in memory. ``benchmarks/generate_throughput.py`` times whole pairs with both kinds of
convolution side by side.

The kernels are compiled on first use with the machine's C++ compiler (``$CXX`` or ``g++``, about
10 s, for the machine's own SIMD width) and cached under ``$KT_CACHE_DIR`` (default
``~/.cache/kt-mlflow``). Without a compiler, ``available()`` is False and the layers keep the
member-major layout.

Example:
    >>> import torch
    >>> from kt_mlflow.blocks.native import available, member_conv2d, interleave
    >>> x, w = torch.randn(2, 4 * 6, 14, 14), torch.randn(4 * 6, 6, 3, 3)  # 4 members, 6 -> 6 channels
    >>> y = member_conv2d(interleave(x, 4), w, members=4) if available() else None  # doctest: +SKIP
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

from ..errors import KTError

log = logging.getLogger(__name__)

KERNELS = ("auto", "native", "torch")

SOURCE = Path(__file__).with_name("member_conv.cpp")
# -fno-trapping-math: without it GCC keeps the BN, ReLU and leaky-gradient loops' compare-and-select as
# branches (FP compares may trap), so on AVX2 they ran scalar, 16x to 18x slower; it changes no result.
FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC")
DTYPES = {torch.float32: "f32", torch.float64: "f64"}   # the kernels' name suffix per dtype


def interleave(x: torch.Tensor, members: int) -> torch.Tensor:
    """Member-major ``(B, members*C, H, W)`` -> interleaved (channel ``c*members + m``), channels-last."""
    b, mc, h, w = x.shape
    y = x.reshape(b, members, mc // members, h, w).transpose(1, 2).reshape(b, mc, h, w)
    return y.contiguous(memory_format=torch.channels_last)


def deinterleave(x: torch.Tensor, members: int) -> torch.Tensor:
    """Interleaved -> member-major (the inverse of ``interleave``)."""
    b, cm, h, w = x.shape
    y = x.reshape(b, cm // members, members, h, w).transpose(1, 2).reshape(b, cm, h, w)
    return y.contiguous(memory_format=torch.channels_last)


def member_order(v: torch.Tensor, members: int) -> torch.Tensor:
    """A per-channel vector in member-major order -> interleaved order."""
    return v.reshape(members, -1).t().reshape(-1)


def stacked_order(v: torch.Tensor, members: int) -> torch.Tensor:
    """A per-channel vector in interleaved order -> member-major order (inverse of ``member_order``)."""
    return v.reshape(-1, members).t().reshape(-1)


def _cache_dir() -> Path:
    root = os.environ.get("KT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kt-mlflow")
    return Path(root)


def _cpu_signature() -> str:
    """What ``-march=native`` compiles for: a cache shared between machines must not mix builds."""
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(line for line in f if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        return os.uname().machine


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels (built once per machine and source), or None when they cannot be built."""
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        return _without("no C++ compiler found (set $CXX or install g++)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + repr((compiler, FLAGS, _cpu_signature())).encode()).hexdigest()[:16]
    path = _cache_dir() / f"member_conv-{key}.so"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=path.parent)
            os.close(fd)
            try:
                # OpenMP where the compiler has it (the threads are then PyTorch's own); else without.
                for extra in (["-fopenmp"], []):
                    done = subprocess.run([compiler, *FLAGS, *extra, str(SOURCE), "-o", tmp], capture_output=True, text=True)
                    if done.returncode == 0:
                        break
                if done.returncode != 0:
                    return _without(f"building them failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
                os.replace(tmp, path)  # atomic: concurrent builders never load a half-written library
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return _without(f"{e} (set $KT_CACHE_DIR to a writable folder)")
    for suffix in DTYPES.values():
        for name, pointers, longs in (("forward", 3, 11), ("forward_ep", 4, 11), ("backward_data", 3, 11),
                                      ("backward_weight", 3, 11), ("pool_forward", 4, 16), ("pool_forward_ep", 5, 16),
                                      ("pool_backward_weight", 5, 16)):
            fn = getattr(lib, f"kt_conv_{name}_{suffix}")
            fn.restype = None
            fn.argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_long] * longs   # shape..., threads
        gather = getattr(lib, f"kt_gather_members_{suffix}")
        gather.restype = None
        gather.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_long] * 8
        for name, pointers, longs in (("bn_sums", 6, 3), ("bn_apply", 8, 3)):
            fn = getattr(lib, f"kt_{name}_{suffix}")
            fn.restype = None
            fn.argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_long] * longs
        leaky = getattr(lib, f"kt_leaky_grad_{suffix}")
        leaky.restype = None
        leaky.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_double, ctypes.c_void_p, ctypes.c_long, ctypes.c_long]
    lib.kt_openmp.restype = ctypes.c_int
    lib.kt_dropout_mask_f32.restype = None
    lib.kt_dropout_mask_f32.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_float,
                                        ctypes.c_ulong, ctypes.c_long]
    return lib


def _without(reason: str) -> None:
    log.warning("native kernels unavailable, %s: stacked networks use the slower grouped convolutions", reason)
    return None


def available() -> bool:
    return library() is not None


def kernel(name: str, dtype: torch.dtype):
    """The compiled function ``kt_{name}_{f32|f64}`` for ``dtype`` (the library must have built)."""
    return getattr(library(), f"kt_{name}_{DTYPES[dtype]}")


def use_native(kernels: str, device: torch.device, family: str = "", supported: bool = True) -> bool:
    """Resolve a ``--kernels`` choice: ``native`` (interleaved members, this module's kernels),
    ``torch`` (grouped convolutions) or ``auto`` (native on a CPU where they build and the family's
    layers are all 'same' convolutions, ``supported``)."""
    if kernels not in KERNELS:
        raise KTError(f"unknown --kernels {kernels!r}; use one of {', '.join(KERNELS)}.")
    if kernels == "native" and not supported:
        raise KTError(f"--kernels native runs the conv families' 'same' convolutions; family {family} has other "
                      f"layers: use --kernels torch (or auto).")
    if kernels == "torch" or not supported or (kernels == "auto" and device.type != "cpu"):
        return False
    if device.type != "cpu":
        raise KTError(f"--kernels native runs on a CPU; on {device} use --kernels torch (or auto).")
    if not available():
        if kernels == "native":
            raise KTError("--kernels native needs a C++ compiler to build them (install g++ or set $CXX), "
                          "or use --kernels torch.")
        return False
    return True


@functools.lru_cache(maxsize=None)
def _pool(threads: int, pid: int) -> ThreadPoolExecutor:
    """Threads for one process (``pid``: a forked child must not wait on its parent's threads)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="kt-conv")


def _at(t: Optional[torch.Tensor], offset: int = 0) -> Optional[int]:
    """The address of ``t``'s element ``offset`` (None: a null pointer, an argument the kernel goes without)."""
    return None if t is None else t.data_ptr() + offset * t.element_size()


def _call(name: str, tensors: Sequence[Tuple[Optional[torch.Tensor], int]], shape: Sequence[int], summed: bool) -> None:
    """Run kernel ``name`` over the batch, split across torch's intra-op threads.

    ``tensors``: the kernel's tensor arguments, each with its elements per image (0: shared by every
    image); the last one is written. ``summed``: every image adds into all of the last tensor (a
    weight gradient), so each thread adds into its own zeroed copy, summed at the end. Built with
    OpenMP, the library splits the batch itself on PyTorch's OpenMP threads; otherwise the parts run
    on a pool of Python threads (ctypes frees the GIL). Both give the same results.
    """
    lib = library()
    fn = kernel(f"conv_{name}", tensors[0][0].dtype)
    batch, rest = shape[0], tuple(shape[1:])
    threads = max(1, min(torch.get_num_threads(), batch))
    if threads == 1 or lib.kt_openmp():
        fn(*(_at(t) for t, _ in tensors), batch, *rest, threads)
        return
    out = tensors[-1][0]
    outs = [out] + [torch.zeros_like(out) for _ in range(threads - 1)] if summed else [out] * threads
    bounds = [batch * i // threads for i in range(threads + 1)]

    def part(i: int) -> None:
        args = [(t, e) for t, e in tensors[:-1]] + [(outs[i], tensors[-1][1])]
        fn(*(_at(t, bounds[i] * e) for t, e in args), bounds[i + 1] - bounds[i], *rest, 1)

    list(_pool(threads, os.getpid()).map(part, range(threads)))
    for extra in outs[1:] if summed else ():
        out += extra


def _conv_shape(x: torch.Tensor, wv: torch.Tensor, kernel: int, stride: int) -> Tuple[int, ...]:
    """The kernels' shape arguments (B, H, W, Ci, Co, K, k, s, Ho, Wo)."""
    _, ci, co, k = wv.shape
    b, _, h, w = x.shape
    pad = kernel // 2
    return b, h, w, ci, co, k, kernel, stride, (h + 2 * pad - kernel) // stride + 1, (w + 2 * pad - kernel) // stride + 1


def _forward(x: torch.Tensor, wv: torch.Tensor, kernel: int, stride: int, shift: Optional[torch.Tensor] = None):
    """The forward kernel on channels-last ``x``: ``(x, out, shape)``; with ``shift``, ``relu(conv + shift)``
    applied in the kernel's epilogue."""
    x = x.contiguous(memory_format=torch.channels_last)
    shape = b, h, w, ci, co, k, _, _, ho, wo = _conv_shape(x, wv, kernel, stride)
    out = torch.empty((b, co * k, ho, wo), dtype=x.dtype, memory_format=torch.channels_last)
    sizes = h * w * ci * k, ho * wo * co * k
    if shift is None:
        _call("forward", [(x, sizes[0]), (wv, 0), (out, sizes[1])], shape, False)
    else:
        _call("forward_ep", [(x, sizes[0]), (wv, 0), (shift, 0), (out, sizes[1])], shape, False)
    return x, out, shape


class _MemberConv(torch.autograd.Function):
    """``x`` interleaved channels-last ``(B, Ci*K, H, W)``, ``wv`` ``(T, Ci, Co, K)``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, wv: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
        x, out, ctx.shape = _forward(x, wv, kernel, stride)
        ctx.save_for_backward(x, wv)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, wv = ctx.saved_tensors
        g = g.contiguous(memory_format=torch.channels_last)
        b, h, w, ci, co, k, kernel, stride, ho, wo = ctx.shape
        gx = _input_grad(g, x, wv, ctx.shape) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            gw = torch.zeros_like(wv)
            _call("backward_weight", [(x, h * w * ci * k), (g, ho * wo * co * k), (gw, 0)], ctx.shape, True)
        return gx, gw, None, None


def _input_grad(g: torch.Tensor, x: torch.Tensor, wv: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
    """The input gradient of a member conv of ``shape`` (``_conv_shape``), ``g`` channels-last."""
    b, h, w, ci, co, k, kernel, stride, ho, wo = shape
    if stride == 1:
        # At stride 1 the input gradient of a "same" conv is the forward conv of the gradient with the
        # kernel flipped and in/out swapped: a gather in registers, not a scatter into a zeroed tensor.
        gx = torch.empty_like(x, memory_format=torch.channels_last)
        flipped = wv.flip(0).transpose(1, 2).contiguous()                   # (T, Co, Ci, K)
        _call("forward", [(g, ho * wo * co * k), (flipped, 0), (gx, h * w * ci * k)],
              (b, ho, wo, co, ci, k, kernel, 1, h, w), False)
        return gx
    gx = torch.zeros_like(x, memory_format=torch.channels_last)
    _call("backward_data", [(g, ho * wo * co * k), (wv, 0), (gx, h * w * ci * k)], shape, False)
    return gx


class _MemberConvShiftReLU(torch.autograd.Function):
    """``relu(member_conv(x, wv) + shift)``, the shift and ReLU applied in the conv's epilogue (no pass
    over memory of their own); gradient to ``x`` only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, wv: torch.Tensor, kernel: int, stride: int, shift: torch.Tensor) -> torch.Tensor:
        x, out, ctx.shape = _forward(x, wv, kernel, stride, shift)
        ctx.save_for_backward(x, wv, out)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, wv, out = ctx.saved_tensors
        g = torch.ops.aten.threshold_backward(g.contiguous(memory_format=torch.channels_last), out, 0)
        return _input_grad(g, x, wv, ctx.shape), None, None, None, None


class _MemberConvMaxPool(torch.autograd.Function):
    """``max_pool2d(member_conv(x, wv), pool)``, one image's full-resolution output at a time; with
    ``shift``, ``relu(that + shift)`` in the same pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, wv: torch.Tensor, kernel: int, pool: Tuple[int, int, int],
                shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        shape = b, h, w, ci, co, k, _, _, ho, wo = _conv_shape(x, wv, kernel, 1)
        pk, ps, pp = pool
        hp, wp = (ho + 2 * pp - pk) // ps + 1, (wo + 2 * pp - pk) // ps + 1
        out = torch.empty((b, co * k, hp, wp), dtype=x.dtype, memory_format=torch.channels_last)
        # argmax positions (exact in the float type), for the backward pass only
        arg = torch.empty_like(out) if any(ctx.needs_input_grad) else None
        per = hp * wp * co * k
        # the output and the argmax are both written: one call fills both (``arg`` last, per image; null: not)
        fn_shape = (*shape, pk, ps, pp, hp, wp)
        if shift is None:
            _call("pool_forward", [(x, h * w * ci * k), (wv, 0), (out, per), (arg, per)], fn_shape, False)
        else:
            _call("pool_forward_ep", [(x, h * w * ci * k), (wv, 0), (shift, 0), (out, per), (arg, per)], fn_shape, False)
        ctx.save_for_backward(x, arg, out if shift is not None else None)
        ctx.shape, ctx.wv_shape = fn_shape, wv.shape
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if ctx.needs_input_grad[0]:
            raise RuntimeError("member_conv2d_max_pool computes no input gradient (its input is the images)")
        x, arg, out = ctx.saved_tensors
        g = g.contiguous(memory_format=torch.channels_last)
        b, h, w, ci, co, k, *_, hp, wp = ctx.shape
        n, per = math.prod(ctx.wv_shape), hp * wp * co * k
        # with out: through the ReLU into the shift's gradient too, as autograd's ReLU and broadcast add would
        sums = torch.zeros(n + (co * k if out is not None else 0), dtype=x.dtype)
        _call("pool_backward_weight", [(x, h * w * ci * k), (g, per), (arg, per), (out, per), (sums, 0)],
              ctx.shape, True)
        gw = sums[:n].view(ctx.wv_shape) if ctx.needs_input_grad[1] else None
        gshift = sums[n:] if ctx.needs_input_grad[4] else None
        return None, gw, None, None, gshift


def _lanes(weight: torch.Tensor, members: int) -> torch.Tensor:
    """``(members*Co, Ci, k, k)`` member-major weights -> the kernels' ``(k*k, Ci, Co, members)``."""
    kc, ci, kh, kw = weight.shape
    return weight.reshape(members, kc // members, ci, kh * kw).permute(3, 2, 1, 0).contiguous()


def check(x: torch.Tensor) -> None:
    """Refuse what the kernels cannot run (another device or dtype, or no library)."""
    if x.device.type != "cpu" or x.dtype not in DTYPES or not available():
        raise RuntimeError("the native kernels run float32/float64 CPU tensors, once built (see available())")


def member_conv2d(x: torch.Tensor, weight: torch.Tensor, members: int, stride: int = 1) -> torch.Tensor:
    """A bias-free "same" convolution of ``members`` networks on interleaved channels-last input.

    ``weight`` is the stacked layer's own ``(members*Co, Ci, k, k)`` (member major), so parameters,
    state dicts and optimisers are the same in both layouts. Output: interleaved ``(B, Co*members, Ho, Wo)``.
    """
    check(x)
    return _MemberConv.apply(x, _lanes(weight, members), weight.shape[-1], stride)


def member_conv2d_shift_relu(x: torch.Tensor, weight: torch.Tensor, members: int, shift: torch.Tensor,
                             stride: int = 1) -> torch.Tensor:
    """``relu(member_conv2d(x, weight, members, stride) + shift)``, ``shift`` ``(Co*members,)`` in the
    interleaved channel order, in one pass: the shift and ReLU in the conv's epilogue (an eval-mode BN
    folded into ``weight`` and its ReLU). The gradient goes to ``x`` only."""
    check(x)
    if weight.requires_grad or shift.requires_grad:
        raise RuntimeError("member_conv2d_shift_relu passes no gradient to the weight or the shift")
    return _MemberConvShiftReLU.apply(x, _lanes(weight, members), weight.shape[-1], stride,
                                      shift.to(x.dtype).contiguous())


def member_linear(x: torch.Tensor, weight: torch.Tensor, members: int) -> torch.Tensor:
    """``members`` bias-free linear maps of interleaved channels-last features ``(B, C*members, H, W)``,
    each reading its member's features in ``(C, H, W)`` order, as ``nn.Linear`` after a flatten does:
    ``weight`` ``(members*Co, C*H*W)`` member major; output ``(B, members*Co)`` member major.

    It is a 1x1 member conv with ``H*W*C`` input channels whose positions are the images, which reads
    the features where they lie: no transposed copy of them forward or backward, and the input gradient
    comes back channels-last, as the layers before want it. Images as positions (not as a batch of
    one-position images) let a register tile reuse each weight for several images, and the weight
    gradient sum over images in registers.
    """
    b, ck, h, w = x.shape
    c, co = ck // members, weight.shape[0] // members
    parts = math.gcd(b, torch.get_num_threads())   # "images" of b / parts positions: one per thread
    flat = x.permute(0, 2, 3, 1).reshape(parts, 1, b // parts, h * w * ck).permute(0, 3, 1, 2)  # a view of x
    wt = weight.view(members * co, c, h, w).permute(0, 2, 3, 1).reshape(members * co, h * w * c, 1, 1)
    y = member_conv2d(flat, wt, members)                          # (parts, Co*members, 1, b/parts) interleaved
    return y.permute(0, 2, 3, 1).reshape(b, co, members).transpose(1, 2).reshape(b, members * co)


def member_conv2d_max_pool(x: torch.Tensor, weight: torch.Tensor, members: int,
                           pool: Tuple[int, int, int] = (3, 2, 1), shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``max_pool2d(member_conv2d(x, weight, members), *pool)`` without the full-resolution tensor in
    memory (``pool`` = kernel, stride, padding); with ``shift`` (``(Co*members,)``, interleaved channel
    order), ``relu(that + shift)`` in the same pass. Gradients reach ``weight`` and ``shift``, not ``x``."""
    check(x)
    if shift is not None:
        shift = shift.to(x.dtype).contiguous()
    return _MemberConvMaxPool.apply(x, _lanes(weight, members), weight.shape[-1], tuple(pool), shift)
