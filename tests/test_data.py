import gzip

import pytest
import torch

from kt_mlflow.data import load_dataset, read_idx
from kt_mlflow.errors import KTError


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
