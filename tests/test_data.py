import numpy as np
import pytest
import torch

from workloads import data


def test_stdlib_corpus_is_real_python_and_split_deterministically():
    d = data.stdlib_corpus()
    assert d.vocab_size == 256 and d.train.size > 1_000_000 and d.val.size > 100_000
    text = bytes(d.train[:200_000]).decode("utf-8", errors="replace")
    assert "def " in text and "import " in text
    data.stdlib_corpus.cache_clear()
    again = data.stdlib_corpus()
    assert np.array_equal(again.val, d.val)


def test_token_batches_are_shifted_windows_and_seeded(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    a = data.TokenBatches(tokens, 4, 16, seed=3, device=torch.device("cpu"))
    b = data.TokenBatches(tokens, 4, 16, seed=3, device=torch.device("cpu"))
    x, y = a.next()
    x2, _ = b.next()
    assert x.shape == (4, 16) and torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(x, x2)


def test_text_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 200)
    (tmp_path / "b.txt").write_text("lorem ipsum\n" * 200)
    d = data.load_text("text", str(tmp_path))
    assert d.train.size + d.val.size == 24 * 200 and d.vocab_size == 256
    with pytest.raises(FileNotFoundError, match="data_path"):
        data.load_text("text", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="needs data_path"):
        data.load_text("text", None)


def test_nanogpt_bin_shards(tmp_path):
    np.arange(5000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(500, dtype=np.uint16).tofile(tmp_path / "val.bin")
    d = data.load_text("bin", str(tmp_path), vocab_size=5000)
    assert d.train.size == 5000 and d.val[10] == 10 and d.vocab_size == 5000
    (tmp_path / "val.bin").unlink()
    with pytest.raises(FileNotFoundError, match="val.bin"):
        data.load_text("bin", str(tmp_path))


def test_digits_are_real_resized_and_normalised():
    d = data.load_images("digits", 16)
    assert d.train_x.shape[1:] == (1, 16, 16) and d.num_classes == 10 and d.in_chans == 1
    assert len(d.train_y) + len(d.val_y) == 1797
    assert abs(float(d.train_x.mean())) < 1e-3 and float(d.train_x.std()) == pytest.approx(1.0, rel=1e-2)
    assert set(d.val_y.tolist()) == set(range(10))


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    d = data.load_images("imagefolder", 8, str(tmp_path))
    assert d.num_classes == 2 and d.train_x.shape[1:] == (3, 8, 8) and len(d.train_y) + len(d.val_y) == 20


def test_cifar10_never_downloads(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        data.load_images("cifar10", 32, str(tmp_path))
    assert list(tmp_path.iterdir()) == []
