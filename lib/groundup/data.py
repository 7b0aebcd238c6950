"""Data loaders: MNIST, CIFAR-10, Tiny Shakespeare, WikiText-2.

Hand-written plumbing. Every loader looks in three places, in this order:

1. a mirror directory named by the environment variable ``BOOK_DATA`` (layout below);
2. the user's cache, ``BOOK_CACHE`` or ``~/.cache/groundup/data`` (same layout);
3. the canonical source on the internet, downloaded with a progress bar, checked against its
   published checksum, converted into the cache's layout.

Layout (the one of the book's offline mirror)::

    mnist/train.npz, mnist/test.npz                 images uint8 [N,28,28], labels uint8 [N]
    cifar10/train-0.npz … train-4.npz, test.npz      images uint8 [N,32,32,3], labels, classes
    tinyshakespeare/input.txt                        UTF-8 text
    wikitext-2/train.txt, valid.txt, test.txt        UTF-8 text (tokenized variant)
    gpt2/vocab.json, gpt2/merges.txt                 GPT-2's tokenizer files (as on the Hub)
    SHA256SUMS                                       "<sha256>  <path>" per file

A file listed in its folder's ``SHA256SUMS`` is checked before use: a truncated or corrupt file
raises :class:`DataError` naming the file and both checksums, never silent garbage. A file that is
not listed there (or a folder without ``SHA256SUMS``) is checked against :data:`PUBLISHED_SHA256`
when it is one of the files whose digest the library knows: those copied unchanged from their
canonical source (the texts and GPT-2's tokenizer files). The ``.npz`` files are conversions (the
mirror's and the cache's differ, byte for byte), so no published digest exists for them: unlisted,
they are only checked for the arrays they must hold. Nothing found and no network:
:class:`DataError` naming the files and the variable to set.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .runtime import book_root


class DataError(Exception):
    """Data missing or corrupt. The message says which files, and what to do."""

    def _render_traceback_(self):  # IPython shows this message instead of a stack trace
        return [f"DataError: {self}"]


MNIST_SOURCE = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_FILES = {  # file -> md5, as published with the data set (and checked by torchvision)
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
WIKITEXT2_URL = "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2/"
WIKITEXT2_SHA256 = {
    "valid.txt": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "test.txt": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
    "train.txt": None,  # not known to us: recorded in the cache's SHA256SUMS at first download
}
GPT2_URL = "https://huggingface.co/openai-community/gpt2/resolve/main/"
GPT2_SHA256 = {  # = OpenAI's encoder.json and vocab.bpe (the digests tiktoken pins), as on the Hub
    "vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# The sha256 of every file the library knows a published digest for: files copied byte for byte from
# their canonical source. Used where a folder's SHA256SUMS does not list the file (or is absent).
PUBLISHED_SHA256 = {
    "tinyshakespeare/input.txt": SHAKESPEARE_SHA256,
    **{f"wikitext-2/{f}": d for f, d in WIKITEXT2_SHA256.items() if d is not None},
    **{f"gpt2/{f}": d for f, d in GPT2_SHA256.items()},
}
DOWNLOAD_TIMEOUT_S = 20


# ----------------------------------------------------------------------------- where data lives

def mirror_dir() -> Path | None:
    """``BOOK_DATA`` as an absolute path; a relative one is taken from the book's root folder."""
    value = os.environ.get("BOOK_DATA")
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else (book_root() / path).resolve()


def cache_dir() -> Path:
    return Path(os.environ.get("BOOK_CACHE") or Path.home() / ".cache" / "groundup" / "data").expanduser()


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file (sha256 for our checksums, md5 where a source publishes only that)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256(path: Path) -> str:
    return file_digest(path, "sha256")


def _read_sums(root: Path) -> dict[str, str]:
    """``root/SHA256SUMS`` as {path: digest}; {} if there is none. A file that is not in
    ``sha256sum``'s format ("<64 hex digits>  <path>" per line, UTF-8) is a :class:`DataError`
    saying which line."""
    sums_file = root / "SHA256SUMS"
    if not sums_file.exists():
        return {}
    fix = ("Restore it (for the mirror, copy it again; for the cache, delete it and the cache's "
           "files and run again to download them afresh).")
    try:
        text = sums_file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{sums_file} is not UTF-8 text ({err}). {fix}") from None
    except OSError as err:
        raise DataError(f"{sums_file} cannot be read ({err}). {fix}") from None
    sums = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        digest = parts[0].lower()
        name = parts[1].strip().lstrip("*") if len(parts) == 2 else ""
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not name:
            raise DataError(f"{sums_file}, line {number}, is not "
                            f"'<sha256 in 64 hex digits>  <path>': {line[:120]!r}. {fix}")
        sums[name] = digest
    return sums


_verified: set[tuple[str, float, int]] = set()


def verify(root: Path, rel: str) -> Path:
    """Check ``root/rel`` against ``root/SHA256SUMS`` (when it lists the file); return its path."""
    path = root / rel
    if not path.is_file():
        raise DataError(
            f"{path} is {'a directory' if path.is_dir() else 'not a regular file'}, where the "
            f"data file {rel} should be. Remove it and put the file there (for the mirror, copy it "
            "again; for the cache, delete it and run again to download the file)."
        )
    stat = path.stat()
    key = (str(path), stat.st_mtime, stat.st_size)
    if key in _verified:
        return path
    expected = _read_sums(root).get(rel)
    source = f"SHA256SUMS in {root} expects"
    if expected is None and rel in PUBLISHED_SHA256:  # not listed: the published digest, if known
        expected, source = PUBLISHED_SHA256[rel], "its published digest (known to groundup.data) is"
    if expected is not None:
        actual = sha256(path)
        if actual != expected:
            raise DataError(
                f"checksum failed for {path}: {source} {expected}, the file has {actual}. "
                "The file is corrupt or truncated: restore it (for the mirror, copy it again; for the cache, "
                f"delete {path} and run again to download it afresh)."
            )
    _verified.add(key)
    return path


def _record_sum(root: Path, rel: str) -> None:
    sums = _read_sums(root)
    sums[rel] = sha256(root / rel)
    (root / "SHA256SUMS").write_text("".join(f"{d}  {n}\n" for n, d in sorted(sums.items())))


def locate(name: str, rels: list[str], download) -> tuple[Path, str]:
    """The folder holding all of ``rels``: the mirror, else the cache, else a fresh download into the cache.

    Returns ``(folder, source)`` where source says which of the three it was, without this machine's paths
    (it is recorded in results and shown on the website); error messages name the folders.
    """
    looked, candidates = [], []
    mirror, cache = mirror_dir(), cache_dir()
    if mirror is None:
        looked.append("no mirror (BOOK_DATA is not set)")
    else:
        candidates.append((mirror, f"mirror (BOOK_DATA={mirror})", "offline mirror (BOOK_DATA)"))
    candidates.append((cache, f"cache ({cache})", "download cache"))
    for folder, where, source in candidates:
        missing = [r for r in rels if not (folder / r).exists()]
        if not missing:
            for r in rels:
                verify(folder, r)
            return folder, source
        looked.append(f"the {where}, which lacks {', '.join(missing)}")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        download(cache)
    except (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError) as err:
        raise DataError(
            f"{name} not found. Needed: {', '.join(rels)}. Looked in {'; '.join(looked)}; "
            f"downloading from the canonical source failed ({getattr(err, 'reason', err)}). "
            "Either set BOOK_DATA to a folder with the book's data layout (in this repository: "
            "`export BOOK_DATA=../shared/data`, see book/setup.md), or connect to the internet so that "
            "the data can be downloaded into the cache."
        ) from None
    for r in rels:
        verify(cache, r)
    return cache, "downloaded into the download cache"


def _download(url: str, dest: Path) -> Path:
    """Fetch ``url`` to ``dest`` with a progress bar; skip it if already there."""
    if dest.exists():
        return dest
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=dest.name, suffix=".part", delete=False) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, \
                    tqdm(total=int(response.headers.get("Content-Length") or 0) or None,
                         unit="B", unit_scale=True, desc=dest.name) as bar:
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    tmp.write(chunk)
                    bar.update(len(chunk))
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)  # never leave a partial download behind
            raise
    os.replace(tmp.name, dest)
    return dest


def _check_digest(path: Path, expected: str, kind: str) -> None:
    actual = file_digest(path, kind)
    if actual != expected:
        path.unlink()
        raise DataError(f"checksum failed for the download {path.name}: {kind} {actual}, expected {expected}. "
                        "The partial file was deleted; run again to retry the download.")


# ----------------------------------------------------------------------------- data sets

@dataclass
class ImageSet:
    """Images as uint8 arrays (N,H,W) or (N,H,W,C), integer labels, class names and provenance."""
    name: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self) -> dict:
        return {"dataset": self.name, "split": self.split, "examples": len(self), "source": self.source}


@dataclass
class TextSet:
    name: str
    split: str
    text: str
    source: str

    def describe(self) -> dict:
        return {"dataset": self.name, "split": self.split, "characters": len(self.text), "source": self.source}


def _load_npz(path: Path, required: tuple[str, ...] = ("images", "labels")) -> dict:
    """The arrays of an ``.npz`` file of the book's layout; ``required`` must all be there."""
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise DataError(f"{path} is not a readable .npz file ({err}); restore or delete it") from None
    missing = [k for k in required if k not in arrays]
    if missing:
        raise DataError(
            f"{path} lacks the array(s) {', '.join(missing)} "
            f"(it holds {sorted(arrays) or 'none'}): it is not a file of the book's data layout, "
            f"which needs {', '.join(required)}. Restore it (for the mirror, copy it again; for "
            "the cache, delete it and run again to download it afresh)."
        )
    return arrays


def _idx(raw: bytes) -> np.ndarray:
    """Parse the IDX format of the MNIST files: magic, dims as big-endian int32, then uint8 data."""
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _download_mnist(cache: Path) -> None:
    raw = cache / "mnist" / "raw"
    for file, md5 in MNIST_FILES.items():
        _download(MNIST_SOURCE + file, raw / file)
        _check_digest(raw / file, md5, "md5")
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _idx(gzip.decompress((raw / f"{prefix}-images-idx3-ubyte.gz").read_bytes()))
        labels = _idx(gzip.decompress((raw / f"{prefix}-labels-idx1-ubyte.gz").read_bytes()))
        np.savez(cache / "mnist" / f"{split}.npz", images=images, labels=labels)
        _record_sum(cache, f"mnist/{split}.npz")


def load_mnist(split: str = "train") -> ImageSet:
    """MNIST digits, uint8 [N,28,28]. The book's mirror holds the first 17,435 training images."""
    if split not in ("train", "test"):
        raise ValueError(f"MNIST split must be 'train' or 'test', not {split!r}")
    root, source = locate("MNIST", [f"mnist/{split}.npz"], _download_mnist)
    arrays = _load_npz(root / "mnist" / f"{split}.npz")
    return ImageSet("MNIST", split, arrays["images"], arrays["labels"].astype(np.int64),
                    [str(i) for i in range(10)], source)


def _download_cifar10(cache: Path) -> None:
    archive = _download(CIFAR10_URL, cache / "cifar10" / "raw" / "cifar-10-python.tar.gz")
    _check_digest(archive, CIFAR10_MD5, "md5")
    with tarfile.open(archive) as tar:
        def batch(member):
            d = pickle.load(io.BytesIO(tar.extractfile(f"cifar-10-batches-py/{member}").read()), encoding="bytes")
            images = d[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW rows -> HWC
            return np.ascontiguousarray(images), np.asarray(d[b"labels"], dtype=np.uint8)
        for i in range(5):
            images, labels = batch(f"data_batch_{i + 1}")
            np.savez(cache / "cifar10" / f"train-{i}.npz", images=images, labels=labels, classes=CIFAR10_CLASSES)
            _record_sum(cache, f"cifar10/train-{i}.npz")
        images, labels = batch("test_batch")
        np.savez(cache / "cifar10" / "test.npz", images=images, labels=labels, classes=CIFAR10_CLASSES)
        _record_sum(cache, "cifar10/test.npz")


def load_cifar10(split: str = "train", shards=range(5)) -> ImageSet:
    """CIFAR-10, uint8 [N,32,32,3] (HWC, RGB). ``shards`` picks which of the five 10k training shards."""
    if split not in ("train", "test"):
        raise ValueError(f"CIFAR-10 split must be 'train' or 'test', not {split!r}")
    rels = [f"cifar10/train-{i}.npz" for i in shards] if split == "train" else ["cifar10/test.npz"]
    root, source = locate("CIFAR-10", rels, _download_cifar10)
    parts = [_load_npz(root / r, ("images", "labels", "classes")) for r in rels]
    return ImageSet("CIFAR-10", split if split == "test" else f"train shards {list(shards)}",
                    np.concatenate([p["images"] for p in parts]),
                    np.concatenate([p["labels"] for p in parts]).astype(np.int64),
                    [str(c) for c in parts[0]["classes"]], source)


def _download_text(url: str, expected: str | None, cache: Path, rel: str) -> None:
    path = _download(url, cache / rel)
    if expected is not None:
        _check_digest(path, expected, "sha256")
    _record_sum(cache, rel)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err}); restore or delete it") from None


def load_tinyshakespeare() -> TextSet:
    """Tiny Shakespeare (the char-rnn file), 1,115,394 characters."""
    rel = "tinyshakespeare/input.txt"
    root, source = locate("Tiny Shakespeare", [rel],
                          lambda cache: _download_text(SHAKESPEARE_URL, SHAKESPEARE_SHA256, cache, rel))
    return TextSet("Tiny Shakespeare", "all", _read_text(root / rel), source)


def load_wikitext2(split: str = "valid") -> TextSet:
    """WikiText-2, tokenized variant. The book's mirror holds only ``valid`` and ``test``."""
    file = f"{split}.txt"  # WIKITEXT2_SHA256 is keyed by file name
    if file not in WIKITEXT2_SHA256:
        splits = [f.removesuffix(".txt") for f in WIKITEXT2_SHA256]
        raise ValueError(f"WikiText-2 split must be one of {splits}, not {split!r}")
    rel = f"wikitext-2/{file}"
    root, source = locate(f"WikiText-2 ({split})", [rel],
                          lambda cache: _download_text(WIKITEXT2_URL + file, WIKITEXT2_SHA256[file], cache, rel))
    return TextSet("WikiText-2", split, _read_text(root / rel), source)



def gpt2_tokenizer_files() -> tuple[Path, Path]:
    """GPT-2's byte-level BPE files ``(vocab.json, merges.txt)``, as published with GPT-2 and on the
    Hugging Face Hub's ``gpt2`` model: from the mirror, else the cache, else downloaded from the Hub
    (checked against :data:`GPT2_SHA256` either way)."""
    rels = [f"gpt2/{f}" for f in GPT2_SHA256]

    def download(cache: Path) -> None:
        for file, digest in GPT2_SHA256.items():
            _download_text(GPT2_URL + file, digest, cache, f"gpt2/{file}")

    root, _ = locate("GPT-2's tokenizer files", rels, download)
    return root / "gpt2" / "vocab.json", root / "gpt2" / "merges.txt"
