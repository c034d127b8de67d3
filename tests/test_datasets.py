"""fashion_mnist, cifar10 (read without unpickling), imagefolder, and fitting images to a network's input.

Every dataset here is a few dozen images written under tmp_path in the layout it is read from; nothing
downloads (the download functions are replaced by ones that fail the test if called).
"""
import gzip
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
import torchvision.datasets.utils
from PIL import Image

import kt_mlflow.data.cifar_pickle as kt_pickle
import kt_mlflow.data.imagefolder as kt_folder
from kt_mlflow.data import DATASETS, load_dataset
from kt_mlflow.data.cifar import CIFAR_MD5, CIFAR_URL, load_cifar10_raw
from kt_mlflow.data.fit import MIN_CONTRAST, colour_pairs, fit_images
from kt_mlflow.data.imagefolder import load_imagefolder_raw
from kt_mlflow.data.images import channel_stats, normalise
from kt_mlflow.data.mnist_sets import load_mnist_raw
from kt_mlflow.errors import KTError

RNG = np.random.default_rng(7)


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any download a test did not replace with a fake fails it (recorded: the loaders turn errors into KTErrors)."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a test tried to download")

    for name in ("MNIST", "FashionMNIST", "CIFAR10"):
        monkeypatch.setattr(torchvision.datasets, name, refuse)
    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", refuse)
    load_dataset.cache_clear()
    yield calls
    load_dataset.cache_clear()
    assert not calls, "a download was attempted"


def one_line_error(match, fn, *args, **kwargs):
    with pytest.raises(KTError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


# --- fashion_mnist -------------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    raw = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw += array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if compress else raw)


def write_fashion(folder: Path, compress: bool = True, n_train: int = 50, n_test: int = 20) -> dict:
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x, y = RNG.integers(0, 256, (n, 28, 28)), RNG.integers(0, 10, n)
        suffix = ".gz" if compress else ""
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", x, compress)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", y, compress)
        arrays[split] = (x, y)
    return arrays


def normalised(pixels: np.ndarray, train_pixels: np.ndarray) -> torch.Tensor:
    """``pixels / 255`` normalised per channel with the mean and std of ``train_pixels / 255``."""
    train = torch.from_numpy(train_pixels.astype(np.float32) / 255.0)
    mean, std = (torch.tensor(s).view(1, -1, 1, 1) for s in channel_stats(train))
    return (torch.from_numpy(pixels.astype(np.float32) / 255.0) - mean) / std


def test_fashion_mnist_reads_torchvisions_layout_and_the_bare_files(tmp_path):
    arrays = write_fashion(tmp_path / "tv" / "FashionMNIST" / "raw")
    d = load_dataset("fashion_mnist", str(tmp_path / "tv"))
    assert d.name == "fashion_mnist" and d.train_x.shape == (50, 1, 28, 28) and d.test_x.shape == (20, 1, 28, 28)
    assert d.train_y.tolist() == arrays["train"][1].tolist() and d.test_y.tolist() == arrays["t10k"][1].tolist()
    train_pixels = arrays["train"][0][:, None]
    assert torch.allclose(d.train_x, normalised(train_pixels, train_pixels), atol=1e-5)
    assert torch.allclose(d.test_x, normalised(arrays["t10k"][0][:, None], train_pixels), atol=1e-5)
    assert abs(float(d.train_x.mean())) < 1e-5 and abs(float(d.train_x.std()) - 1) < 0.02
    bare = write_fashion(tmp_path / "bare", compress=False)  # the four raw files directly in data_root
    b = load_dataset("fashion_mnist", str(tmp_path / "bare"))
    assert b.test_y.tolist() == bare["t10k"][1].tolist() and b.train_x.shape == (50, 1, 28, 28)


def test_fashion_mnist_needs_a_data_root_and_all_four_files(tmp_path, monkeypatch):
    one_line_error("fashion_mnist needs --data-root", load_dataset, "fashion_mnist")
    one_line_error("not a folder", load_dataset, "fashion_mnist", str(tmp_path / "absent"))
    write_fashion(tmp_path / "half")
    (tmp_path / "half" / "train-labels-idx1-ubyte.gz").unlink()
    one_line_error("lacks train-labels-idx1-ubyte", load_dataset, "fashion_mnist", str(tmp_path / "half"))
    bad = tmp_path / "bad"
    write_fashion(bad)
    write_idx(bad / "t10k-labels-idx1-ubyte.gz", np.full(20, 12))
    one_line_error("label 12, outside 0..9", load_dataset, "fashion_mnist", str(bad))


def test_an_empty_folder_gets_fashion_mnist_downloaded_into_it(tmp_path, monkeypatch):
    seen = []

    class FakeFashionMNIST:  # torchvision's FashionMNIST without the internet
        def __init__(self, root, train, download):
            assert download
            seen.append(train)
            write_fashion(Path(root) / "FashionMNIST" / "raw", n_train=30, n_test=10)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    d = load_dataset("fashion_mnist", str(tmp_path))
    assert sorted(seen) == [False, True] and len(d.train_x) == 30 and len(d.test_x) == 10

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://...")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    (tmp_path / "empty").mkdir()
    one_line_error("could not download Fashion-MNIST into .*empty", load_dataset, "fashion_mnist",
                   str(tmp_path / "empty"))


# --- cifar10 -------------------------------------------------------------------------------------------------


def forbidden(*args, **kwargs):
    raise AssertionError("something was unpickled")


def cifar_batch(n: int):
    return RNG.integers(0, 256, (n, 3072), dtype=np.uint8), [int(v) for v in RNG.integers(0, 10, n)]


def py2_batch(data: np.ndarray, labels: list) -> bytes:
    """A CIFAR-10 batch as Python 2's cPickle writes it (protocol 2), assembled opcode by opcode."""
    def s(text: bytes) -> bytes:  # SHORT_BINSTRING
        return b"U" + bytes([len(text)]) + text

    def label(i: int, v: int) -> bytes:  # the three int encodings, in turn
        return (b"K" + bytes([v]), b"M" + v.to_bytes(2, "little"), b"J" + v.to_bytes(4, "little"))[i % 3]

    n, raw = len(labels), data.tobytes()
    out = [b"\x80\x02}q\x01(", s(b"data"), b"cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray\nq\x03",
           b"K\x00\x85", s(b"b"), b"\x87Rq\x04(K\x01M", n.to_bytes(2, "little"), b"M\x00\x0c\x86",
           b"cnumpy\ndtype\nq\x05", s(b"u1"), b"K\x00K\x01\x87Rq\x06(K\x03", s(b"|"),
           b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T", len(raw).to_bytes(4, "little"), raw, b"q\x07tb",
           s(b"labels"), b"]q\x08"]
    for start in range(0, n, 1000):  # cPickle appends in batches of 1000
        out += [b"(", *(label(i, v) for i, v in enumerate(labels[start: start + 1000], start)), b"e"]
    out += [s(b"batch_label"), s(b"testing batch 1 of 1"), b"u."]
    return b"".join(out)


def write_cifar(folder: Path, batches: dict, protocol=2) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (data, labels) in batches.items():
        blob = (py2_batch(data, labels) if protocol == "py2" else
                pickle.dumps({b"batch_label": b"ours", b"labels": labels, b"data": data}, protocol=protocol))
        (folder / name).write_bytes(blob)


def test_the_hand_assembled_python2_stream_is_a_real_pickle():
    data, labels = cifar_batch(1001)
    with warnings.catch_warnings():  # our own bytes; numpy.core is numpy 2's deprecated alias
        warnings.simplefilter("ignore")
        batch = pickle.loads(py2_batch(data, labels), encoding="latin1")
    assert np.array_equal(batch["data"], data) and batch["labels"] == labels and len(labels) > 1000  # 2 APPENDS


@pytest.mark.parametrize("protocol", ["py2", 2, 4, 5])
def test_cifar10_batches_round_trip_without_unpickling(tmp_path, monkeypatch, protocol):
    batches = {"data_batch_1": cifar_batch(30), "data_batch_3": cifar_batch(20), "test_batch": cifar_batch(25)}
    write_cifar(tmp_path / "cifar-10-batches-py", batches, protocol)
    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (np, "load"), (torch, "load")):
        monkeypatch.setattr(module, name, forbidden)  # nothing may unpickle
    raw = load_cifar10_raw(str(tmp_path))  # only some train batches: those found are used
    train = np.concatenate([batches["data_batch_1"][0], batches["data_batch_3"][0]])
    assert raw.name == "cifar10" and raw.train_x.shape == (50, 3, 32, 32) and raw.test_x.shape == (25, 3, 32, 32)
    assert raw.train_y.tolist() == batches["data_batch_1"][1] + batches["data_batch_3"][1]
    assert raw.test_y.tolist() == batches["test_batch"][1] and raw.train_y.dtype == torch.int64
    # Row layout: 1024 R, then 1024 G, then 1024 B, each 32x32 row-major: G at (y=5, x=7) is [1, 5, 7].
    assert int(raw.train_x[33, 1, 5, 7]) == int(train[33, 1024 + 5 * 32 + 7])
    assert torch.equal(raw.train_x.reshape(50, 3072), torch.from_numpy(train))
    d = load_dataset("cifar10", str(tmp_path), channels=3, image_size=32)
    assert d.name == "cifar10" and d.train_x.shape == (50, 3, 32, 32)
    assert d.train_x.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert (d.train_x.std(dim=(0, 2, 3)) - 1).abs().max() < 0.01


def test_cifar10_files_directly_in_the_data_root_and_the_required_test_batch(tmp_path):
    write_cifar(tmp_path, {"data_batch_2": cifar_batch(10), "test_batch": cifar_batch(10)}, protocol=4)
    assert len(load_cifar10_raw(str(tmp_path)).train_x) == 10
    (tmp_path / "test_batch").unlink()
    one_line_error("has no test_batch", load_cifar10_raw, str(tmp_path))
    one_line_error("cifar10 needs --data-root", load_dataset, "cifar10")
    one_line_error("not a folder", load_dataset, "cifar10", str(tmp_path / "absent"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not cifar")
    one_line_error("holds no CIFAR-10 batches but other files", load_dataset, "cifar10", str(tmp_path / "other"))


class Payload:
    """Unpickling this runs ``func(*args)``: the attack a pickle can carry."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_pickle_that_refers_to_other_callables_is_refused_and_nothing_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    for payload, refers in ((Payload(os.system, f"touch {marker}"), r"refers to (posix|nt)\.system"),
                            (Payload(open, str(marker), "w"), r"refers to \S*\.open")):
        blob = pickle.dumps({b"data": payload, b"labels": [0]}, protocol=protocol)
        write_cifar(folder, {"data_batch_1": cifar_batch(5)})
        (folder / "test_batch").write_bytes(blob)
        one_line_error(f"test_batch is not a plain CIFAR-10 batch: it {refers}", load_cifar10_raw, str(tmp_path))
        assert not marker.exists()
    pickle.loads(blob)[b"data"].close()  # the control: unpickled, the last payload does create the file
    assert marker.exists()


def batch_with(**entries) -> bytes:
    data, labels = cifar_batch(4)
    return pickle.dumps({b"data": entries.get("data", data), b"labels": entries.get("labels", labels)}, protocol=4)


@pytest.mark.parametrize("blob, match", [
    (batch_with(labels=[0, 1, 2, 10]), "'labels' holds values other than integers 0..9"),
    (batch_with(labels=[0, 1, 2]), r"'data' is \(4, 3072\) with 12288 bytes, but 3 labels"),
    (batch_with(data=np.zeros((4, 3072), np.float32)), "not a C-order uint8 array"),
    (batch_with(data=np.zeros((4, 3072), np.uint8).T.copy().T), "not a C-order uint8 array"),
    (batch_with(data=[1, 2, 3]), "'data' is not a numpy array"),
    (batch_with()[:5000], "not a readable CIFAR-10 batch"),
    (b"\x00not a pickle at all", "not a readable CIFAR-10 batch|not a plain CIFAR-10 batch"),
    (pickle.dumps([1, 2], protocol=2), "does not hold a dict"),
    (pickle.dumps({b"data": b"x"}, protocol=2), "no 'labels' entry"),
    (pickle.dumps({1.5, 2.5}, protocol=4), "opcode EMPTY_SET"),
])
def test_malformed_cifar10_batches_get_one_line_errors(tmp_path, blob, match):
    (tmp_path / "test_batch").write_bytes(blob)
    msg = one_line_error(match, kt_pickle.read_cifar_batch, tmp_path / "test_batch")
    assert str(tmp_path / "test_batch") in msg and "re-download" in msg


def test_an_oversized_cifar10_file_is_refused_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(kt_pickle, "MAX_BATCH_BYTES", 1000)
    (tmp_path / "test_batch").write_bytes(batch_with())
    monkeypatch.setattr(kt_pickle.pickletools, "genops", None)  # never reached
    one_line_error("bytes, far more than a CIFAR-10 batch", kt_pickle.read_cifar_batch, tmp_path / "test_batch")


def test_an_empty_folder_gets_cifar10_downloaded_into_it(tmp_path, monkeypatch):
    seen = []

    def fake_download(url, root, md5=None, **kwargs):
        seen.append((url, md5))
        write_cifar(Path(root) / "cifar-10-batches-py", {"data_batch_1": cifar_batch(8), "test_batch": cifar_batch(4)})

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", fake_download)
    d = load_dataset("cifar10", str(tmp_path), channels=3, image_size=32)
    assert seen == [(CIFAR_URL, CIFAR_MD5)] and len(d.train_x) == 8 and len(d.test_x) == 4

    def offline(*args, **kwargs):
        raise RuntimeError("<urlopen error [Errno -2]>\nTraceback ...")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    (tmp_path / "empty").mkdir()
    one_line_error("could not download CIFAR-10 into .*empty", load_dataset, "cifar10", str(tmp_path / "empty"))


# --- imagefolder ---------------------------------------------------------------------------------------------

COLOURS = {"ant": (255, 0, 0), "cat": (0, 255, 0), "dog": (0, 0, 255)}  # sorted: ant 0, cat 1, dog 2
SIZES = [(10, 12), (40, 30), (64, 64), (16, 16), (7, 9)]


def write_images(folder: Path, per_class: int = 5, classes=COLOURS) -> None:
    for name in classes:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = SIZES[i % len(SIZES)]
            suffix = (".png", ".PNG", ".bmp")[i % 3]
            Image.new("RGB", (w, h), COLOURS[name]).save(folder / name / f"{i:02d}{suffix}")
        (folder / name / "notes.txt").write_text("not an image: ignored")


def test_imagefolder_decodes_resizes_and_labels_by_sorted_class(tmp_path):
    write_images(tmp_path)
    raw = load_imagefolder_raw(str(tmp_path), channels=3, image_size=16)
    assert raw.train_x.shape == (12, 3, 16, 16) and raw.test_x.shape == (3, 3, 16, 16)  # 15 images, 80 / 20
    names = sorted(COLOURS)
    for x, y in zip(torch.cat([raw.train_x, raw.test_x]), torch.cat([raw.train_y, raw.test_y])):
        assert x[:, 8, 8].tolist() == list(COLOURS[names[int(y)]])  # a solid image stays its colour
    assert sorted(torch.cat([raw.train_y, raw.test_y]).tolist()) == [0] * 5 + [1] * 5 + [2] * 5
    gray = load_imagefolder_raw(str(tmp_path), channels=1, image_size=8)
    assert gray.train_x.shape == (12, 1, 8, 8)
    assert {int(v) for v in gray.train_x.flatten()} <= {76, 150, 29}  # PIL's luma of red, green, blue
    d = load_dataset("imagefolder", str(tmp_path), channels=3, image_size=16)
    assert d.name == "imagefolder-rgb-16" and torch.equal(d.train_y, raw.train_y)
    assert d.train_x.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    load_dataset.cache_clear()
    assert load_dataset("imagefolder", str(tmp_path), channels=3, image_size=16).digest == d.digest


def test_imagefolder_uses_train_and_test_subfolders_when_both_exist(tmp_path):
    write_images(tmp_path / "train", per_class=3)
    write_images(tmp_path / "test", per_class=2, classes=["cat", "dog"])  # a test split may lack a class
    raw = load_imagefolder_raw(str(tmp_path), channels=3, image_size=12)
    assert raw.train_y.tolist() == [0] * 3 + [1] * 3 + [2] * 3 and raw.test_y.tolist() == [1, 1, 2, 2]
    assert raw.test_x[0, :, 0, 0].tolist() == list(COLOURS["cat"])
    write_images(tmp_path / "test", per_class=1, classes=["cat"])
    (tmp_path / "test" / "emu").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "test" / "emu" / "a.png")
    one_line_error("has class 'emu', which .*train lacks", load_imagefolder_raw, str(tmp_path), 3, 12)


def test_imagefolder_errors_are_one_line(tmp_path, monkeypatch, capsys):
    one_line_error("imagefolder needs --data-root", load_dataset, "imagefolder")
    one_line_error("not a folder", load_dataset, "imagefolder", str(tmp_path / "absent"))
    write_images(tmp_path / "one", classes=["ant"])
    one_line_error("has 1 class folder.*at least 2", load_dataset, "imagefolder", str(tmp_path / "one"))
    write_images(tmp_path / "hollow", classes=["ant", "cat"])
    (tmp_path / "hollow" / "bee").mkdir()
    (tmp_path / "hollow" / "bee" / "readme.md").write_text("no images")
    one_line_error("class folder .*bee holds no images", load_dataset, "imagefolder", str(tmp_path / "hollow"))
    write_images(tmp_path / "broken", classes=["ant", "cat"])
    (tmp_path / "broken" / "cat" / "99.jpg").write_bytes(b"not a jpeg")
    one_line_error("cannot read image .*99.jpg", load_dataset, "imagefolder", str(tmp_path / "broken"))
    one_line_error("colour=True .*got imagefolder", load_dataset, "imagefolder", str(tmp_path / "one"), 3, 28, True)
    monkeypatch.setattr(kt_folder, "PROGRESS_OVER", 3)  # many files: a progress bar
    write_images(tmp_path / "many", per_class=2, classes=["ant", "cat"])
    load_imagefolder_raw(str(tmp_path / "many"), 1, 8)
    assert "decoding images" in capsys.readouterr().err


# --- fitting to the network's input --------------------------------------------------------------------------


def test_mnist_in_colour_at_32_is_deterministic_and_padded_with_each_images_background():
    d = load_dataset("mnist", None, 3, 32, True)
    assert d.name == "mnist-colour-32" and d.train_x.shape == (8000, 3, 32, 32) and d.test_x.shape == (2000, 3, 32, 32)
    load_dataset.cache_clear()
    assert load_dataset("mnist", None, 3, 32, True).digest == d.digest
    assert d.train_x.mean(dim=(0, 2, 3)).abs().max() < 1e-4 and (d.train_x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3
    raw = load_mnist_raw(None)
    assert torch.equal(d.train_y, raw.train_y)
    fitted = fit_images(raw.train_x.float() / 255.0, 3, 32, colour=True, stream=0)
    assert torch.equal(d.train_x, normalise(fitted.clone(), *channel_stats(fitted)))
    fg, bg = colour_pairs(8000, stream=0)
    border = torch.cat([fitted[:, :, :2].flatten(2), fitted[:, :, -2:].flatten(2),
                        fitted[:, :, :, :2].flatten(2), fitted[:, :, :, -2:].flatten(2)], dim=2)
    assert torch.equal(border, bg[:, :, None].expand_as(border))  # the 2-pixel pad is each image's background
    ink = raw.train_x[:, 0] == 255  # full-intensity pixels are exactly the foreground
    i, y, x = ink.nonzero()[0].tolist()
    assert torch.equal(fitted[i, :, y + 2, x + 2], fg[i])
    assert ((fg - bg).norm(dim=1) >= MIN_CONTRAST).all() and len({tuple(c) for c in bg.tolist()}) == 8000
    test_fg, _ = colour_pairs(2000, stream=1)
    assert not torch.equal(test_fg, fg[:2000])  # train and test draw from different streams


def test_gray_sources_pad_repeat_and_shrink():
    padded = load_dataset("mnist", None, 1, 32)
    assert padded.name == "mnist-32" and padded.train_x.shape == (8000, 1, 32, 32)
    assert (padded.train_x[:, :, :2] == padded.train_x[0, 0, 0, 0]).all()  # the pad is the normalised 0
    rgb = load_dataset("mnist", None, 3, 28)
    assert rgb.name == "mnist-rgb-28" and torch.equal(rgb.train_x[:, 0], rgb.train_x[:, 2])
    small = load_dataset("digits", None, 1, 14)
    assert small.name == "digits-14" and small.train_x.shape == (1437, 1, 14, 14)
    default = load_dataset("mnist", None, 1, 28, False)
    assert default.name == "mnist" and default.digest == "4bd4637c22c7297f"  # the defaults are untouched


def test_cifar10_to_gray_takes_luma(tmp_path):
    write_cifar(tmp_path, {"data_batch_1": cifar_batch(12), "test_batch": cifar_batch(6)}, protocol=4)
    raw = load_cifar10_raw(str(tmp_path))
    x = raw.train_x.float() / 255.0
    gray = fit_images(x, 1, 32)
    assert torch.allclose(gray[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])
    d = load_dataset("cifar10", str(tmp_path))  # the defaults: 1 channel, 28 pixels
    assert d.name == "cifar10-gray-28" and d.train_x.shape == (12, 1, 28, 28) and d.test_x.shape == (6, 1, 28, 28)
    assert abs(float(d.train_x.mean())) < 1e-5 and abs(float(d.train_x.std()) - 1) < 0.01


@pytest.mark.parametrize("args, match", [
    (("digits", None, 2), "channels must be 1 .* or 3"),
    (("digits", None, True), "channels must be 1"),
    (("digits", None, 1, 3), "image_size must be an integer >= 4"),
    (("digits", None, 1, 28.0), "image_size must be an integer"),
    (("mnist", None, 1, 28, True), "colour=True .*channels=3 .*got mnist with channels=1"),
    (("cifar10", None, 3, 32, True), "colour=True .*got cifar10"),
    (("cifar",), "unknown dataset 'cifar'"),
])
def test_impossible_inputs_get_one_line_errors(args, match):
    one_line_error(match, load_dataset, *args)


def test_every_dataset_is_listed():
    assert DATASETS == ("digits", "mnist", "fashion_mnist", "cifar10", "imagefolder")
