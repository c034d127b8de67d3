"""Read a CIFAR-10 batch file (a Python pickle) as data, without unpickling it.

``pickletools.genops`` only decodes the opcode stream; a small stack machine here rebuilds plain
values (ints, strings, bytes, lists, tuples, dicts) and records the few allowed callables (numpy's
array reconstructors, ``numpy.dtype``, ``_codecs.encode``) as inert markers. Nothing named in the
file is imported or called, so a file that refers to anything else (``os.system``...) is refused
before any of it could matter. Python 2 cPickle (the real files), and protocols 2-5 from Python 3.

Example:
    >>> images, labels = read_cifar_batch(Path("cifar-10-batches-py/test_batch"))  # doctest: +SKIP
    >>> images.shape, labels[:3]  # doctest: +SKIP
    ((10000, 3, 32, 32), array([3, 8, 8]))
"""
from __future__ import annotations

import pickletools
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from ..errors import KTError, first_line

MAX_BATCH_BYTES = 200 * 1024 * 1024  # a real batch is ~31 MB; refuse anything far larger before reading it
PIXELS = 3 * 32 * 32
CLASSES = 10
_ALLOWED: Dict[Tuple[str, str], str] = {  # (module, name) -> what it stands for; never imported
    ("numpy.core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy.core.numeric", "_frombuffer"): "frombuffer",
    ("numpy._core.numeric", "_frombuffer"): "frombuffer",
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
    ("_codecs", "encode"): "encode",
}
_PUSH = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT", "STRING",
         "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "UNICODE",
         "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_IGNORED = {"PROTO", "FRAME"}  # framing only


class _Bad(Exception):
    """Internal: the stream is not a plain CIFAR-10 batch; the message says why."""


class _Global:
    """An allowed callable, by name only."""

    def __init__(self, kind: str) -> None:
        self.kind = kind


class _Call:
    """A recorded ``REDUCE`` of an allowed callable (never performed), plus the state a ``BUILD`` gave it."""

    def __init__(self, kind: str, args: tuple) -> None:
        self.kind, self.args, self.state = kind, args, None


def _call(func: Any, args: Any) -> Any:
    """``REDUCE``: ``_codecs.encode(text, 'latin1')`` is bytes (how Python 3 writes bytes at protocol 2)."""
    if not isinstance(func, _Global) or not isinstance(args, tuple):
        raise _Bad("a REDUCE of something other than an allowed callable")
    if func.kind == "encode":
        if len(args) != 2 or not isinstance(args[0], str) or args[1] not in ("latin1", "latin-1"):
            raise _Bad("_codecs.encode with arguments other than (text, 'latin1')")
        return _as_bytes(args[0])
    if func.kind == "ndarray":
        raise _Bad("a direct numpy.ndarray call")
    return _Call(func.kind, args)


class _Machine:
    """The pickle stack machine, restricted to building data: one small method per opcode it accepts."""

    def __init__(self) -> None:
        self.stack: List[Any] = []
        self.marks: List[int] = []
        self.memo: Dict[int, Any] = {}

    def pop(self) -> Any:
        if not self.stack:
            raise _Bad("an opcode takes from an empty stack")
        return self.stack.pop()

    def pop_mark(self) -> List[Any]:
        if not self.marks:
            raise _Bad("an item list without its MARK")
        start = self.marks.pop()
        items, self.stack[start:] = self.stack[start:], []
        return items

    def top(self, kind: type) -> Any:
        if not self.stack or not isinstance(self.stack[-1], kind):
            raise _Bad(f"items are added to something that is not a {kind.__name__}")
        return self.stack[-1]

    def append_items(self, items: List[Any]) -> None:
        self.top(list).extend(items)  # the items are off the stack already: the list is on top

    def set_items(self, items: List[Any]) -> None:
        if len(items) % 2:
            raise _Bad("a dict key without its value")
        self.top(dict).update(zip(items[::2], items[1::2]))

    def push_global(self, module: Any, name: Any) -> None:
        if (module, name) not in _ALLOWED:  # refused by name: nothing is ever imported or looked up
            raise _Bad(f"it refers to {str(module)[:60]}.{str(name)[:60]}, and only numpy arrays, lists and "
                       "strings are read")
        self.stack.append(_Global(_ALLOWED[module, name]))

    def tuple_n(self, n: int) -> None:
        if len(self.stack) < n:
            raise _Bad("a tuple of missing items")
        items, self.stack[len(self.stack) - n:] = tuple(self.stack[len(self.stack) - n:]), []
        self.stack.append(items)

    def get(self, key: Any) -> None:
        if key not in self.memo:
            raise _Bad("a memo reference to nothing")
        self.stack.append(self.memo[key])

    def put(self, key: Any) -> None:
        if not self.stack:
            raise _Bad("a memo entry of an empty stack")
        self.memo[key] = self.stack[-1]

    def dict_(self) -> None:
        items = self.pop_mark()
        self.stack.append({})
        self.set_items(items)

    def reduce(self) -> None:
        args = self.pop()
        self.stack.append(_call(self.pop(), args))

    def build(self) -> None:
        state, obj = self.pop(), self.top(_Call)
        if obj.kind not in ("reconstruct", "dtype") or obj.state is not None:
            raise _Bad("a BUILD of something other than a numpy array or dtype")
        obj.state = state

    def stack_global(self) -> None:
        name = self.pop()
        self.push_global(self.pop(), name)

    def step(self, name: str, arg: Any) -> None:
        if name in _PUSH:
            self.stack.append(arg)
        elif name in _CONSTANTS:
            self.stack.append(_CONSTANTS[name])
        elif name in _OPS:
            _OPS[name](self, arg)
        elif name not in _IGNORED:
            raise _Bad(f"it uses the pickle opcode {name}, which a CIFAR-10 batch never has")

    def run(self, raw: bytes) -> Any:
        for op, arg, _pos in pickletools.genops(raw):
            if op.name == "STOP":
                if len(self.stack) != 1 or self.marks:
                    raise _Bad("it ends with a malformed stack")
                return self.stack[0]
            self.step(op.name, arg)
        raise _Bad("it ends before its STOP")  # pragma: no cover - genops raises first


_OPS: Dict[str, Callable[[_Machine, Any], None]] = {
    "EMPTY_LIST": lambda m, _: m.stack.append([]),
    "EMPTY_DICT": lambda m, _: m.stack.append({}),
    "EMPTY_TUPLE": lambda m, _: m.stack.append(()),
    "MARK": lambda m, _: m.marks.append(len(m.stack)),
    "TUPLE": lambda m, _: m.stack.append(tuple(m.pop_mark())),
    "TUPLE1": lambda m, _: m.tuple_n(1),
    "TUPLE2": lambda m, _: m.tuple_n(2),
    "TUPLE3": lambda m, _: m.tuple_n(3),
    "LIST": lambda m, _: m.stack.append(m.pop_mark()),
    "DICT": lambda m, _: m.dict_(),
    "APPEND": lambda m, _: m.append_items([m.pop()]),
    "APPENDS": lambda m, _: m.append_items(m.pop_mark()),
    "SETITEM": lambda m, _: m.set_items([m.pop(), m.pop()][::-1]),
    "SETITEMS": lambda m, _: m.set_items(m.pop_mark()),
    "PUT": lambda m, arg: m.put(arg),
    "BINPUT": lambda m, arg: m.put(arg),
    "LONG_BINPUT": lambda m, arg: m.put(arg),
    "MEMOIZE": lambda m, _: m.put(len(m.memo)),
    "GET": lambda m, arg: m.get(arg),
    "BINGET": lambda m, arg: m.get(arg),
    "LONG_BINGET": lambda m, arg: m.get(arg),
    "POP": lambda m, _: m.pop(),
    "GLOBAL": lambda m, arg: m.push_global(*(str(arg).split(" ", 1) + [""])[:2]),
    "STACK_GLOBAL": lambda m, _: m.stack_global(),
    "REDUCE": lambda m, _: m.reduce(),
    "BUILD": lambda m, _: m.build(),
}


def _as_bytes(raw: Any) -> bytes:
    """An array's raw buffer: bytes, a bytearray, or a Python 2 ``str`` (which genops decodes as latin-1)."""
    if isinstance(raw, (bytes, bytearray)):
        return bytes(raw)
    if isinstance(raw, str):
        try:
            return raw.encode("latin-1")
        except UnicodeEncodeError:
            raise _Bad("the pixel buffer is text, not bytes") from None
    raise _Bad("the pixel buffer is not bytes")


def _is_uint8(dtype: Any) -> bool:
    return isinstance(dtype, _Call) and dtype.kind == "dtype" and bool(dtype.args) and dtype.args[0] in ("u1", b"u1")


def _array(node: Any) -> Tuple[tuple, bytes]:
    """The shape and raw bytes of a recorded uint8 C-order numpy array (``_reconstruct`` or ``_frombuffer``)."""
    if isinstance(node, _Call) and node.kind == "reconstruct":
        state = node.state
        if not (node.args and isinstance(node.args[0], _Global) and node.args[0].kind == "ndarray"):
            raise _Bad("'data' is reconstructed as something other than a numpy array")
        if not isinstance(state, tuple) or len(state) != 5:
            raise _Bad("'data' has no array state")
        _version, shape, dtype, fortran, raw = state
    elif isinstance(node, _Call) and node.kind == "frombuffer" and len(node.args) == 4:
        raw, dtype, shape, order = node.args
        fortran = order != "C"
    else:
        raise _Bad("'data' is not a numpy array")
    if not _is_uint8(dtype) or fortran or not isinstance(shape, tuple):
        raise _Bad("'data' is not a C-order uint8 array")
    if not all(type(d) is int for d in shape):
        raise _Bad("'data' has a malformed shape")
    return shape, _as_bytes(raw)


def _entry(batch: Dict[Any, Any], key: str) -> Any:
    for k in (key, key.encode()):
        if k in batch:
            return batch[k]
    raise _Bad(f"it has no {key!r} entry")


def _parse(batch: Any) -> Tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels int64 from the rebuilt top-level dict, checked."""
    if not isinstance(batch, dict):
        raise _Bad("it does not hold a dict")
    labels = _entry(batch, "labels")
    if not isinstance(labels, list) or not labels:
        raise _Bad("'labels' is not a non-empty list")
    if not all(type(v) is int and 0 <= v < CLASSES for v in labels):
        raise _Bad(f"'labels' holds values other than integers 0..{CLASSES - 1}")
    shape, raw = _array(_entry(batch, "data"))
    n = len(labels)
    if shape not in ((n, PIXELS), (n, 3, 32, 32)) or len(raw) != n * PIXELS:
        raise _Bad(f"'data' is {shape} with {len(raw)} bytes, but {n} labels need ({n}, {PIXELS})")
    images = np.frombuffer(raw, dtype=np.uint8).reshape(n, 3, 32, 32)  # rows: 1024 R, 1024 G, 1024 B
    return images, np.asarray(labels, dtype=np.int64)


def read_cifar_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels int64 from one CIFAR-10 batch file, never unpickled.

    Anything unexpected (too large, truncated, other callables, wrong shapes or labels) is a
    one-line KTError naming the file.
    """
    fix = "re-download it (point --data-root at an empty folder to fetch CIFAR-10 again)"
    try:
        size = path.stat().st_size
        if size > MAX_BATCH_BYTES:
            raise _Bad(f"it is {size} bytes, far more than a CIFAR-10 batch (~31 MB)")
        with open(path, "rb") as f:
            raw = f.read(MAX_BATCH_BYTES + 1)
        if len(raw) > MAX_BATCH_BYTES:  # it grew since stat()
            raise _Bad(f"it is over {MAX_BATCH_BYTES} bytes, far more than a CIFAR-10 batch (~31 MB)")
        return _parse(_Machine().run(raw))
    except OSError as e:
        raise KTError(f"cannot read CIFAR-10 batch {path} ({e.strerror or e}); {fix}.") from None
    except _Bad as e:
        raise KTError(f"{path} is not a plain CIFAR-10 batch: {e}; {fix}.") from None
    except (ValueError, TypeError, EOFError) as e:  # genops' decoding errors; TypeError: an unhashable dict key
        raise KTError(f"{path} is not a readable CIFAR-10 batch ({first_line(e, 120)}); {fix}.") from None
