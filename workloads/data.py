"""Offline data sources. Nothing here downloads anything.

Text (byte-level language modelling, vocabulary 256, or the uint16 tokens of nanoGPT shards):
  ``stdlib``        the Python standard library's own ``.py`` sources (``sysconfig`` stdlib path,
                    site-packages and test suites excluded): a real corpus present on every machine.
                    Deterministic split: a file goes to validation when crc32(relative path) % 10 == 0.
  ``text``          a text file or a folder of them (``data_path``); the last 10 % is validation.
  ``bin``           nanoGPT-style ``train.bin`` / ``val.bin`` uint16 token shards in ``data_path``.

Images (classification):
  ``digits``        scikit-learn's bundled 8x8 handwritten digits (1,797 real images), resized.
  ``imagefolder``   a torchvision ``ImageFolder`` tree at ``data_path`` (``train/`` and ``val/``
                    sub-folders if present, else a deterministic 90/10 split).
  ``cifar10``       an already-downloaded CIFAR-10 at ``data_path`` (``download=False``).
  ``synthetic``     Gaussian class-conditional images; only for tests, asked for explicitly.

Marginal baselines (:func:`text_baseline`, :func:`image_baseline`): the loss of a model that ignores
its inputs. A run whose final validation loss is not detectably below it learned nothing (outcome
class ``collapsed``, see ``workloads.outcome``). Computed once per data set and cached in the process.
The same marginal, as a per-item cost (:func:`text_marginal_nll`, :func:`image_marginal_nll`), gives
the baseline of exactly the validation windows a trial measures its loss on
(:func:`window_baselines`), so that which windows were drawn cancels out of the comparison.
"""

from __future__ import annotations

import functools
import math
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# The sources' names and their cheap check live in workloads.sources, which imports no torch (the
# spec's validation reads them without it); they stay reachable here as before.
from workloads.sources import IMAGE_SOURCES, TEXT_SOURCES, check_source, need_path  # noqa: F401
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


# ----------------------------------------------------------------------------------------- text
@dataclass
class TokenData:
    train: np.ndarray  # 1-D integer tokens
    val: np.ndarray
    vocab_size: int
    description: str


@functools.lru_cache(maxsize=1)
def stdlib_corpus() -> TokenData:
    root = Path(sysconfig.get_paths()["stdlib"])
    train, val = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            try:
                data = path.read_bytes()
            except OSError:
                continue
            (val if zlib.crc32(rel.encode()) % 10 == 0 else train).append(data)
    if not train or not val:
        raise RuntimeError(f"no Python sources found under the stdlib path {root}")
    tr = np.frombuffer(b"".join(train), dtype=np.uint8)
    va = np.frombuffer(b"".join(val), dtype=np.uint8)
    return TokenData(tr, va, 256, f"stdlib sources at {root}: {tr.size:,} train / {va.size:,} val bytes")


def text_corpus(path: str) -> TokenData:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
    elif p.is_file():
        files = [p]
    else:
        raise FileNotFoundError(f"data_path {path!r}: no such file or folder")
    raw = np.frombuffer(b"".join(f.read_bytes() for f in files), dtype=np.uint8)
    if raw.size < 1000:
        raise ValueError(f"data_path {path!r}: only {raw.size} bytes of text; need at least 1000")
    cut = int(raw.size * 0.9)
    return TokenData(raw[:cut], raw[cut:], 256, f"{len(files)} text file(s) at {path}: {raw.size:,} bytes")


def bin_corpus(path: str, vocab_size: int | None) -> TokenData:
    p = Path(path)
    tr, va = p / "train.bin", p / "val.bin"
    for f in (tr, va):
        if not f.is_file():
            raise FileNotFoundError(f"data_path {path!r}: expected nanoGPT shards train.bin and val.bin; missing {f.name}")
    train = np.memmap(tr, dtype=np.uint16, mode="r")
    val = np.memmap(va, dtype=np.uint16, mode="r")
    vocab = vocab_size or 50304  # GPT-2 BPE padded to a multiple of 64, as nanoGPT does
    return TokenData(train, val, vocab, f"nanoGPT shards at {path}: {train.size:,} / {val.size:,} tokens")


def load_text(source: str, data_path: str | None = None, vocab_size: int | None = None) -> TokenData:
    if source == "stdlib":
        return stdlib_corpus()
    if source == "text":
        return text_corpus(need_path(source, data_path))
    if source == "bin":
        return bin_corpus(need_path(source, data_path), vocab_size)
    raise ValueError(f"data: unknown text source {source!r}; allowed: {list(TEXT_SOURCES)}")


_BASELINES: dict[str, float] = {}
BASELINE_MAX_TOKENS = 50_000_000


def unigram_cross_entropy(train: np.ndarray, val: np.ndarray, vocab_size: int,
                          max_tokens: int = BASELINE_MAX_TOKENS) -> float:
    """Cross-entropy (nats per token) of ``val`` under the unigram distribution of ``train``, with
    add-one smoothing so that a token unseen in training has a finite cost. Splits longer than
    ``max_tokens`` are read through evenly spaced contiguous chunks (nanoGPT shards can hold
    billions of tokens): an estimate then, exact otherwise."""
    return marginal_cross_entropy(_token_counts(train, vocab_size, max_tokens),
                                  _token_counts(val, vocab_size, max_tokens))


def marginal_log_prob(train_counts: np.ndarray) -> np.ndarray:
    """log p of each item under the training split's frequencies, add-one smoothed so that an item
    unseen in training has a finite cost."""
    tc = np.asarray(train_counts, np.float64)
    return np.log(tc + 1.0) - math.log(tc.sum() + tc.size)


def marginal_cross_entropy(train_counts: np.ndarray, val_counts: np.ndarray) -> float:
    """Cross-entropy (nats per item) of the validation counts under the training split's
    frequencies, add-one smoothed so that an item unseen in training has a finite cost."""
    vc = np.asarray(val_counts, np.float64)
    return float(-(vc * marginal_log_prob(train_counts)).sum() / vc.sum())


_MARGINALS: dict[str, np.ndarray] = {}


def _token_counts(tokens: np.ndarray, vocab_size: int, max_tokens: int = BASELINE_MAX_TOKENS) -> np.ndarray:
    n = tokens.size
    if n <= max_tokens:
        return np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    chunk, k = 1_000_000, max(1, max_tokens // 1_000_000)
    out = np.zeros(vocab_size, dtype=np.int64)
    for start in np.linspace(0, n - chunk, k).astype(np.int64):
        out += np.bincount(np.asarray(tokens[start:start + chunk], dtype=np.int64), minlength=vocab_size)[:vocab_size]
    return out


def text_marginal_nll(td: TokenData) -> np.ndarray:
    """-log p(token) under the training split's unigram frequencies (add-one smoothed), per token
    id: the marginal baseline's cost of each target (cached per corpus)."""
    key = f"text:{td.description}:{td.vocab_size}"
    if key not in _MARGINALS:
        _MARGINALS[key] = -marginal_log_prob(_token_counts(td.train, td.vocab_size))
    return _MARGINALS[key]


def image_marginal_nll(im: ImageData) -> np.ndarray:
    """-log p(class) under the training split's class frequencies (add-one smoothed), per class."""
    key = f"image:{im.description}:{im.num_classes}"
    if key not in _MARGINALS:
        _MARGINALS[key] = -marginal_log_prob(torch.bincount(im.train_y.cpu(), minlength=im.num_classes).numpy())
    return _MARGINALS[key]


def window_baselines(nll: np.ndarray, batches) -> np.ndarray:
    """The marginal baseline of each validation item (a text window: the mean cost of its targets;
    an image: the cost of its label) of ``batches`` (``[(x, y), ...]``), in batch order: the loss a
    model that ignores its inputs gets on exactly those items."""
    out = []
    for _, y in batches:
        cost = nll[y.detach().cpu().numpy()]
        out.append(cost.reshape(cost.shape[0], -1).mean(axis=1))
    return np.concatenate(out) if out else np.zeros(0)


def _cached_baseline(key: str, compute) -> float:
    if key not in _BASELINES:
        _BASELINES[key] = compute()
    return _BASELINES[key]


def text_baseline(td: TokenData) -> float:
    """The unigram cross-entropy of the validation split (cached per corpus)."""
    return _cached_baseline(f"text:{td.description}:{td.vocab_size}",
                            lambda: unigram_cross_entropy(td.train, td.val, td.vocab_size))


class TokenBatches:
    """Random contiguous windows (nanoGPT's get_batch), from a seeded generator: reproducible."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, device: torch.device):
        if tokens.size <= seq_len + 1:
            raise ValueError(f"corpus of {tokens.size} tokens is too short for seq_len {seq_len}")
        self.tokens, self.bs, self.T, self.device = tokens, batch_size, seq_len, device
        self.rng = np.random.default_rng(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        ix = self.rng.integers(0, self.tokens.size - self.T - 1, size=self.bs)
        windows = np.stack([np.asarray(self.tokens[i:i + self.T + 1], dtype=np.int64) for i in ix])
        xy = torch.from_numpy(windows)
        if self.device.type == "cuda":
            xy = xy.pin_memory().to(self.device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]


# --------------------------------------------------------------------------------------- images
@dataclass
class ImageData:
    train_x: torch.Tensor  # [N, C, H, W] float, normalised
    train_y: torch.Tensor  # [N] int64
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int
    in_chans: int
    description: str


def _resize(x: torch.Tensor, img_size: int) -> torch.Tensor:
    if x.shape[-1] == img_size and x.shape[-2] == img_size:
        return x
    return F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)


def _normalise(train: torch.Tensor, val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (val - mean) / std


@functools.lru_cache(maxsize=4)
def digits_images(img_size: int) -> ImageData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [1797, 1, 8, 8]
    y = torch.tensor(d.target, dtype=torch.int64)
    # deterministic split: every 10th image is validation
    idx = torch.arange(len(y))
    val_mask = idx % 10 == 0
    x = _resize(x, img_size)
    tx, vx = _normalise(x[~val_mask], x[val_mask])
    return ImageData(tx, y[~val_mask], vx, y[val_mask], 10, 1,
                     f"scikit-learn digits resized to {img_size}x{img_size}: {len(tx)} train / {len(vx)} val")


@functools.lru_cache(maxsize=4)
def synthetic_images(img_size: int, num_classes: int = 10, n: int = 2000, seed: int = 0) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(num_classes, 3, img_size, img_size, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = protos[y] + 1.5 * torch.randn(n, 3, img_size, img_size, generator=g)
    cut = int(n * 0.9)
    return ImageData(x[:cut], y[:cut], x[cut:], y[cut:], num_classes, 3,
                     f"synthetic Gaussian images {img_size}x{img_size}, {num_classes} classes (test data)")


def _tensorise(dataset, img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize((img_size, img_size)), transforms.ToTensor()])
    xs, ys = [], []
    for img, label in dataset:
        xs.append(tf(img.convert("RGB")))
        ys.append(label)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)


def folder_images(path: str, img_size: int) -> ImageData:
    from torchvision.datasets import ImageFolder

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"data_path {path!r}: no such folder")
    if (p / "train").is_dir() and (p / "val").is_dir():
        tr, va = ImageFolder(p / "train"), ImageFolder(p / "val")
        tx, ty = _tensorise(((tr.loader(f), c) for f, c in tr.samples), img_size)
        vx, vy = _tensorise(((va.loader(f), c) for f, c in va.samples), img_size)
        classes = len(tr.classes)
    else:
        ds = ImageFolder(p)
        x, y = _tensorise(((ds.loader(f), c) for f, c in ds.samples), img_size)
        val_mask = torch.arange(len(y)) % 10 == 0
        tx, ty, vx, vy = x[~val_mask], y[~val_mask], x[val_mask], y[val_mask]
        classes = len(ds.classes)
    tx, vx = _normalise(tx, vx)
    return ImageData(tx, ty, vx, vy, classes, 3, f"ImageFolder at {path}: {len(tx)} train / {len(vx)} val")


def cifar10_images(path: str, img_size: int) -> ImageData:
    from torchvision.datasets import CIFAR10

    try:
        tr = CIFAR10(path, train=True, download=False)
        va = CIFAR10(path, train=False, download=False)
    except RuntimeError as e:
        raise FileNotFoundError(f"data_path {path!r}: no CIFAR-10 there ({e}); nothing is downloaded") from e
    tx = _resize(torch.tensor(tr.data).permute(0, 3, 1, 2).float() / 255, img_size)
    vx = _resize(torch.tensor(va.data).permute(0, 3, 1, 2).float() / 255, img_size)
    tx, vx = _normalise(tx, vx)
    return ImageData(tx, torch.tensor(tr.targets), vx, torch.tensor(va.targets), 10, 3,
                     f"CIFAR-10 at {path}: {len(tx)} train / {len(vx)} val")


def load_images(source: str, img_size: int, data_path: str | None = None) -> ImageData:
    if source == "digits":
        return digits_images(img_size)
    if source == "synthetic":
        return synthetic_images(img_size)
    if source == "imagefolder":
        return folder_images(need_path(source, data_path), img_size)
    if source == "cifar10":
        return cifar10_images(need_path(source, data_path), img_size)
    raise ValueError(f"data: unknown image source {source!r}; allowed: {list(IMAGE_SOURCES)}")


def class_prior_cross_entropy(train_y: torch.Tensor, val_y: torch.Tensor, num_classes: int) -> float:
    """Cross-entropy (nats) of the validation labels under the training split's class frequencies
    (add-one smoothed): the loss of a classifier that ignores the image."""
    return marginal_cross_entropy(torch.bincount(train_y.cpu(), minlength=num_classes).numpy(),
                                  torch.bincount(val_y.cpu(), minlength=num_classes).numpy())


def image_baseline(im: ImageData) -> float:
    """The class-prior cross-entropy of the validation labels (cached per data set)."""
    return _cached_baseline(f"image:{im.description}:{im.num_classes}",
                            lambda: class_prior_cross_entropy(im.train_y, im.val_y, im.num_classes))


class ImageBatches:
    """Seeded random mini-batches from in-memory tensors (small data sets; one device copy)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, device: torch.device):
        self.x, self.y = x.to(device), y.to(device)
        self.bs = batch_size
        self.g = torch.Generator(device=self.x.device).manual_seed(seed)  # on the data's device:
        # drawing the indices there needs no host-to-device copy (a pageable copy synchronises)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(0, len(self.y), (self.bs,), generator=self.g, device=self.x.device)
        return self.x[ix], self.y[ix]
