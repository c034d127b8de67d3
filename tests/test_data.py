import gzip
import shutil
import time
from pathlib import Path

import pytest
import torch

import kt_mlflow.data.idx as kt_idx
import kt_mlflow.data.mnist_sets as kt_mnist
from kt_mlflow.data import BUNDLED_MNIST, BUNDLED_SHA256, load_dataset, read_idx
from kt_mlflow.errors import KTError

BUNDLED_DIGEST = "4bd4637c22c7297f"  # ImageData.digest of a folder holding only the two t10k files


def test_digits_are_mnist_shaped_and_split_deterministically():
    d = load_dataset("digits")
    assert d.train_x.shape[1:] == (1, 28, 28) and d.train_x.dtype == torch.float32
    assert len(d.train_x) + len(d.test_x) == 1797 and len(d.test_x) == 360
    load_dataset.cache_clear()
    assert torch.equal(load_dataset("digits").test_y, d.test_y)
    assert set(d.train_y.tolist()) == set(range(10))


def test_real_mnist_test_set_is_split_8000_2000(mnist_root):
    d = load_dataset("mnist", mnist_root)
    assert d.train_x.shape == (8000, 1, 28, 28) and d.test_x.shape == (2000, 1, 28, 28)
    assert abs(float(d.train_x.mean())) < 0.05 and abs(float(d.train_x.std()) - 1) < 0.05  # MNIST normalisation
    assert torch.bincount(d.test_y, minlength=10).min() > 150


def test_missing_and_malformed_folders_get_one_line_errors(tmp_path):
    with pytest.raises(KTError, match="not a folder"):
        load_dataset("mnist", str(tmp_path / "absent"))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"")  # some MNIST file, but no t10k: no download
    with pytest.raises(KTError, match="no t10k-images-idx3-ubyte"):
        load_dataset("mnist", str(tmp_path))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + (10).to_bytes(4, "big")
                                                                        + (28).to_bytes(4, "big") * 2 + b"\x00" * 50))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(KTError, match="truncated"):
        read_idx(tmp_path / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(KTError, match="cannot read|not an unsigned-byte IDX"):
        read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(KTError, match="unknown dataset"):
        load_dataset("cifar")


def copy_bundled(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name in BUNDLED_SHA256:
        shutil.copy(BUNDLED_MNIST / name, folder / name)
    return folder


def test_bundled_mnist_is_the_real_test_set_and_equals_reading_its_files_from_a_folder(tmp_path):
    load_dataset.cache_clear()
    d = load_dataset("mnist")
    assert d.name == "mnist" and d.train_x.shape == (8000, 1, 28, 28) and d.test_x.shape == (2000, 1, 28, 28)
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64
    assert set(d.train_y.tolist()) == set(range(10)) == set(d.test_y.tolist())
    f = load_dataset("mnist", str(copy_bundled(tmp_path / "mnist")))
    for a, b in zip((d.train_x, d.train_y, d.test_x, d.test_y), (f.train_x, f.train_y, f.test_x, f.test_y)):
        assert torch.equal(a, b)
    assert d.digest == f.digest == BUNDLED_DIGEST


@pytest.mark.parametrize("damage", ["flip", "missing"])
def test_a_tampered_bundled_file_is_refused_by_its_sha256(tmp_path, monkeypatch, damage):
    folder = copy_bundled(tmp_path / "mnist")
    path = folder / "t10k-images-idx3-ubyte.gz"
    if damage == "flip":
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        path.write_bytes(bytes(raw))
    else:
        path.unlink()
    monkeypatch.setattr(kt_mnist, "BUNDLED_MNIST", folder)
    load_dataset.cache_clear()
    with pytest.raises(KTError, match="t10k-images-idx3-ubyte.gz .*reinstall kt-mlflow") as e:
        load_dataset("mnist")
    assert "\n" not in str(e.value) and ("sha256" in str(e.value) or damage == "missing")
    load_dataset.cache_clear()


class ReadSpy:
    """A file handle that records the size of every read()."""

    def __init__(self, f):
        self.f, self.sizes = f, []

    def read(self, n=-1):
        self.sizes.append(n)
        return self.f.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_bad_idx_header_is_refused_before_the_data_is_read(tmp_path, monkeypatch):
    spies = []
    opener = kt_idx._open_idx
    monkeypatch.setattr(kt_idx, "_open_idx", lambda p: spies.append(ReadSpy(opener(p))) or spies[-1])
    short = tmp_path / "short-images-idx3-ubyte"
    short.write_bytes(b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") + b"\x00\x1c")  # 3 dims promised, 1.5 given
    with pytest.raises(KTError, match="truncated IDX header"):
        read_idx(short)
    # A header claiming 2**31 images (1.7 TB) over 100 bytes of data: refused from its size, nothing allocated.
    huge = (2**31).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100
    for path, payload in ((tmp_path / "huge-images-idx3-ubyte", b"\x00\x00\x08\x03" + huge),
                          (tmp_path / "huge-images-idx3-ubyte.gz", gzip.compress(b"\x00\x00\x08\x03" + huge))):
        path.write_bytes(payload)
        t0 = time.perf_counter()
        with pytest.raises(KTError, match="truncated: header says \\(2147483648, 28, 28\\)"):
            read_idx(path)
        assert time.perf_counter() - t0 < 5
    assert [spy.sizes for spy in spies] == [[4, 12]] * 3  # magic, dims; never the data


class FakeMNIST:
    """torchvision.datasets.MNIST without the internet: "downloads" the bundled files into root/MNIST/raw."""

    def __init__(self, root, train, download):
        assert download
        raw = copy_bundled(Path(root) / "MNIST" / "raw")
        for name in BUNDLED_SHA256:
            shutil.copy(raw / name, raw / name.replace("t10k", "train"))


def test_an_empty_data_root_gets_mnist_downloaded_into_it(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    d = load_dataset("mnist", str(tmp_path))
    assert (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file()
    assert len(d.train_x) == len(d.test_x) == 10_000  # a train set is there: no 8,000 / 2,000 split

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://...")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KTError, match="could not download MNIST into .*empty") as e:
        load_dataset("mnist", str(empty))
    assert "\n" not in str(e.value)
