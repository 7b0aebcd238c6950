"""groundup.data: the loaders read the mirror, else the cache, else download; bad data is an error.

The network is cut off for every test (tests/conftest.py); the download paths are exercised with
``data._download`` replaced by a function that writes small fake files.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from groundup import data
from groundup.data import DataError

pytestmark = pytest.mark.usefixtures("clean_env")


# ----------------------------------------------------------------------------- helpers

def copy_files(src_root: Path, dst_root: Path, rels: list[str]) -> None:
    """Copy files as writable files (the mirror's are read-only)."""
    for rel in rels:
        (dst_root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src_root / rel, dst_root / rel)


def md5_bytes(raw: bytes) -> str:
    return hashlib.md5(raw).hexdigest()


def idx_bytes(array: np.ndarray) -> bytes:
    """An array in the IDX format of the MNIST files."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def fake_downloads(monkeypatch, files: dict[str, bytes]) -> list[str]:
    """Replace data._download by one that writes ``files[name]``; returns the list of names fetched."""
    fetched = []

    def download(url: str, dest: Path) -> Path:
        fetched.append(url)
        if dest.exists():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(files[url.rsplit("/", 1)[-1]])
        return dest

    monkeypatch.setattr(data, "_download", download)
    return fetched


@pytest.fixture
def cache(tmp_path, monkeypatch, clean_env) -> Path:
    path = tmp_path / "cache"
    path.mkdir()
    monkeypatch.setenv("BOOK_CACHE", str(path))
    return path


@pytest.fixture
def with_mirror(mirror, monkeypatch, cache) -> Path:
    monkeypatch.setenv("BOOK_DATA", str(mirror))
    return mirror


# ----------------------------------------------------------------------------- the mirror

def test_mnist_train_from_the_mirror(with_mirror):
    ds = data.load_mnist("train")
    assert len(ds) == 17_435
    assert ds.images.dtype == np.uint8 and ds.images.shape == (17_435, 28, 28)
    assert ds.labels.dtype == np.int64 and ds.labels.shape == (17_435,)
    assert ds.labels.min() == 0 and ds.labels.max() == 9
    assert set(np.unique(ds.labels).tolist()) == set(range(10))
    assert ds.classes == [str(i) for i in range(10)]
    desc = ds.describe()
    assert desc["dataset"] == "MNIST" and desc["split"] == "train" and desc["examples"] == 17_435
    assert "mirror" in desc["source"] and str(with_mirror) not in desc["source"]   # no machine paths


def test_mnist_test_from_the_mirror(with_mirror):
    ds = data.load_mnist("test")
    assert ds.images.shape == (10_000, 28, 28) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int64 and 0 <= ds.labels.min() and ds.labels.max() <= 9
    assert ds.images.max() == 255 and ds.images.min() == 0


def test_mnist_split_is_checked(with_mirror):
    with pytest.raises(ValueError, match="'valid'"):
        data.load_mnist("valid")


def test_cifar10_one_shard_from_the_mirror(with_mirror):
    ds = data.load_cifar10("train", shards=[0])
    assert ds.images.shape == (10_000, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int64
    assert np.bincount(ds.labels, minlength=10).tolist() == [1000] * 10  # the mirror's shards are balanced
    assert ds.classes == data.CIFAR10_CLASSES
    assert ds.classes[0] == "airplane" and len(ds.classes) == 10
    assert ds.describe()["split"] == "train shards [0]"
    assert "mirror" in ds.source


def test_cifar10_split_is_checked(with_mirror):
    with pytest.raises(ValueError):
        data.load_cifar10("valid")


def test_tinyshakespeare_from_the_mirror(with_mirror):
    ds = data.load_tinyshakespeare()
    assert len(ds.text) == 1_115_394
    assert ds.text.startswith("First Citizen:")
    assert ds.describe()["characters"] == 1_115_394
    assert "mirror" in ds.source


def test_wikitext2_valid_from_the_mirror(with_mirror):
    ds = data.load_wikitext2("valid")
    assert ds.split == "valid" and len(ds.text) > 1_000_000
    assert "<unk>" in ds.text  # the tokenized variant
    assert "mirror" in ds.describe()["source"]
    with pytest.raises(ValueError, match="WikiText-2 split"):
        data.load_wikitext2("dev")


def test_a_file_missing_from_the_mirror_and_offline(with_mirror):
    # the mirror has no WikiText-2 training split; the cache is empty; there is no network
    with pytest.raises(DataError) as err:
        data.load_wikitext2("train")
    message = str(err.value)
    assert "wikitext-2/train.txt" in message
    assert f"mirror (BOOK_DATA={with_mirror}), which lacks wikitext-2/train.txt" in message


# ----------------------------------------------------------------------------- errors

def test_nothing_found_and_no_network(monkeypatch, cache):
    calls = []

    def no_network(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data.urllib.request, "urlopen", no_network)
    with pytest.raises(DataError) as err:
        data.load_mnist("train")
    message = str(err.value)
    assert "mnist/train.npz" in message
    assert "BOOK_DATA" in message
    assert "no network" in message
    assert str(cache) in message
    assert calls, "the loader did not try to download"


def test_truncated_mirror_file_fails_its_checksum(mirror, tmp_path, monkeypatch, cache):
    broken = tmp_path / "mirror"
    copy_files(mirror, broken, ["SHA256SUMS", "mnist/train.npz", "mnist/test.npz"])
    target = broken / "mnist" / "test.npz"
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    monkeypatch.setenv("BOOK_DATA", str(broken))
    with pytest.raises(DataError) as err:
        data.load_mnist("test")
    message = str(err.value)
    assert "checksum failed" in message
    assert str(target) in message
    assert len(data.load_mnist("train")) == 17_435  # the intact file of the copy still loads


def test_a_flipped_byte_fails_the_checksum(mirror, tmp_path, monkeypatch, cache):
    broken = tmp_path / "mirror"
    copy_files(mirror, broken, ["SHA256SUMS", "tinyshakespeare/input.txt"])
    target = broken / "tinyshakespeare" / "input.txt"
    raw = bytearray(target.read_bytes())
    raw[1000] = ord("#") if raw[1000] != ord("#") else ord("@")
    target.write_bytes(bytes(raw))  # same size
    monkeypatch.setenv("BOOK_DATA", str(broken))
    with pytest.raises(DataError, match="checksum failed"):
        data.load_tinyshakespeare()


def test_an_unlisted_unreadable_npz_is_an_error(tmp_path, monkeypatch, cache):
    mirror = tmp_path / "mirror"
    (mirror / "mnist").mkdir(parents=True)
    (mirror / "mnist" / "test.npz").write_bytes(b"not a zip file")
    monkeypatch.setenv("BOOK_DATA", str(mirror))
    with pytest.raises(DataError, match="not a readable .npz"):
        data.load_mnist("test")


def test_data_error_renders_without_a_traceback():
    err = DataError("MNIST not found: set BOOK_DATA")
    assert err._render_traceback_() == ["DataError: MNIST not found: set BOOK_DATA"]


# ----------------------------------------------------------------------------- where the data are looked for

def test_relative_book_data_is_taken_from_the_book_root(book_root, monkeypatch):
    monkeypatch.setenv("BOOK_DATA", "data")
    assert data.mirror_dir() == (book_root / "data").resolve()
    monkeypatch.setenv("BOOK_DATA", "../shared/data")
    assert data.mirror_dir() == (book_root.parent / "shared" / "data").resolve()


def test_absolute_and_unset_book_data(tmp_path, monkeypatch):
    assert data.mirror_dir() is None
    monkeypatch.setenv("BOOK_DATA", str(tmp_path))
    assert data.mirror_dir() == tmp_path
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("BOOK_DATA", "~/d")
    assert data.mirror_dir() == tmp_path / "d"


def test_loading_through_a_relative_book_data(mirror, book_root, monkeypatch, cache):
    copy_files(mirror, book_root / "data", ["SHA256SUMS", "mnist/test.npz"])
    monkeypatch.setenv("BOOK_DATA", "data")  # the working directory is book_root/notebooks
    ds = data.load_mnist("test")
    assert len(ds) == 10_000
    assert ds.source == "offline mirror (BOOK_DATA)"            # recorded in results: no machine paths
    assert str(book_root) not in ds.source


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.cache_dir() == tmp_path / ".cache" / "groundup" / "data"
    monkeypatch.setenv("BOOK_CACHE", str(tmp_path / "c"))
    assert data.cache_dir() == tmp_path / "c"


def make_cached_mnist_test(cache: Path, n: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    (cache / "mnist").mkdir(parents=True, exist_ok=True)
    np.savez(cache / "mnist" / "test.npz", images=images, labels=labels)
    data._record_sum(cache, "mnist/test.npz")
    return images, labels


def test_the_cache_is_used_when_there_is_no_mirror(cache):
    images, labels = make_cached_mnist_test(cache)
    sums = (cache / "SHA256SUMS").read_text()
    assert sums == f"{data.sha256(cache / 'mnist' / 'test.npz')}  mnist/test.npz\n"
    ds = data.load_mnist("test")
    assert "cache" in ds.source and str(cache) not in ds.source
    assert np.array_equal(ds.images, images)
    assert np.array_equal(ds.labels, labels) and ds.labels.dtype == np.int64


def test_the_cache_checksum_is_checked(cache):
    make_cached_mnist_test(cache)
    path = cache / "mnist" / "test.npz"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="checksum failed"):
        data.load_mnist("test")


def test_the_mirror_comes_before_the_cache(mirror, monkeypatch, cache):
    make_cached_mnist_test(cache)
    monkeypatch.setenv("BOOK_DATA", str(mirror))
    ds = data.load_mnist("test")
    assert len(ds) == 10_000 and "mirror" in ds.source


def test_the_cache_is_used_when_the_mirror_lacks_a_file(tmp_path, monkeypatch, cache):
    (tmp_path / "empty-mirror").mkdir()
    monkeypatch.setenv("BOOK_DATA", str(tmp_path / "empty-mirror"))
    make_cached_mnist_test(cache, n=3)
    ds = data.load_mnist("test")
    assert len(ds) == 3 and "cache" in ds.source


def test_record_sum_keeps_other_entries_sorted(tmp_path):
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "a.txt").write_text("a")
    data._record_sum(tmp_path, "b.txt")
    data._record_sum(tmp_path, "a.txt")
    assert data._read_sums(tmp_path) == {"a.txt": hashlib.sha256(b"a").hexdigest(),
                                        "b.txt": hashlib.sha256(b"b").hexdigest()}
    assert (tmp_path / "SHA256SUMS").read_text().splitlines()[0].endswith("  a.txt")


# ----------------------------------------------------------------------------- the IDX parser

def test_idx_parser_on_hand_made_bytes():
    raw = (b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
           + bytes(range(12)))
    array = data._idx(raw)
    assert array.dtype == np.uint8 and array.shape == (2, 2, 3)
    assert array.tolist() == np.arange(12).reshape(2, 2, 3).tolist()
    labels = data._idx(b"\x00\x00\x08\x01" + (4).to_bytes(4, "big") + bytes([7, 0, 9, 3]))
    assert labels.shape == (4,) and labels.tolist() == [7, 0, 9, 3]


def test_idx_parser_big_dimensions():
    array = np.arange(300 * 2, dtype=np.int64).reshape(300, 2) % 256
    assert np.array_equal(data._idx(idx_bytes(array)), array.astype(np.uint8))


# ----------------------------------------------------------------------------- the download paths (offline)

def mnist_sources(n_train: int = 6, n_test: int = 4):
    rng = np.random.default_rng(1)
    arrays = {
        "train": (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_train)),
        "test": (rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_test)),
    }
    files = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = arrays[split]
        files[f"{prefix}-images-idx3-ubyte.gz"] = gzip.compress(idx_bytes(images), mtime=0)
        files[f"{prefix}-labels-idx1-ubyte.gz"] = gzip.compress(idx_bytes(labels), mtime=0)
    return arrays, files


def test_mnist_download_converts_into_the_cache_layout(monkeypatch, cache):
    arrays, files = mnist_sources()
    fetched = fake_downloads(monkeypatch, files)
    monkeypatch.setattr(data, "MNIST_FILES", {name: md5_bytes(raw) for name, raw in files.items()})

    ds = data.load_mnist("test")
    assert ds.source.startswith("downloaded into the download cache")
    assert sorted(u.rsplit("/", 1)[-1] for u in fetched) == sorted(files)
    assert all(u.startswith(data.MNIST_SOURCE) for u in fetched)
    assert np.array_equal(ds.images, arrays["test"][0])
    assert np.array_equal(ds.labels, arrays["test"][1])
    for split in ("train", "test"):
        with np.load(cache / "mnist" / f"{split}.npz") as f:
            assert f["images"].dtype == np.uint8 and f["images"].shape == arrays[split][0].shape
            assert np.array_equal(f["labels"], arrays[split][1])
    sums = data._read_sums(cache)
    assert sums == {f"mnist/{s}.npz": data.sha256(cache / "mnist" / f"{s}.npz") for s in ("train", "test")}

    # from now on the cache serves both splits without another download
    fetched.clear()
    train = data.load_mnist("train")
    assert train.source.startswith("download cache") and len(train) == 6
    assert fetched == []


def test_mnist_download_with_a_bad_checksum(monkeypatch, cache):
    _, files = mnist_sources()
    fake_downloads(monkeypatch, files)
    md5s = {name: md5_bytes(raw) for name, raw in files.items()}
    md5s["t10k-images-idx3-ubyte.gz"] = "0" * 32
    monkeypatch.setattr(data, "MNIST_FILES", md5s)
    with pytest.raises(DataError) as err:
        data.load_mnist("test")
    assert "checksum failed for the download t10k-images-idx3-ubyte.gz" in str(err.value)
    assert not (cache / "mnist" / "raw" / "t10k-images-idx3-ubyte.gz").exists()  # deleted for a retry
    assert not (cache / "mnist" / "test.npz").exists()


def cifar_archive(n: int = 3) -> tuple[bytes, dict[str, tuple[np.ndarray, list[int]]]]:
    rng = np.random.default_rng(2)
    batches = {}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for member in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)  # CIFAR's rows: R plane, G plane, B plane
            labels = rng.integers(0, 10, n).tolist()
            batches[member] = (rows, labels)
            raw = pickle.dumps({b"data": rows, b"labels": labels, b"batch_label": member.encode()}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{member}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return buffer.getvalue(), batches


def test_cifar10_download_converts_to_hwc(monkeypatch, cache):
    archive, batches = cifar_archive()
    fake_downloads(monkeypatch, {"cifar-10-python.tar.gz": archive})
    monkeypatch.setattr(data, "CIFAR10_MD5", md5_bytes(archive))

    ds = data.load_cifar10("train", shards=[0, 3])
    assert ds.source.startswith("downloaded into the download cache")
    assert ds.images.shape == (6, 32, 32, 3) and ds.images.dtype == np.uint8
    rows0, labels0 = batches["data_batch_1"]
    rows3, labels3 = batches["data_batch_4"]
    assert ds.labels.tolist() == labels0 + labels3
    # pixel (h, w) of channel c is byte c*1024 + h*32 + w of a row
    for k, rows in ((0, rows0), (3, rows3)):
        image, row = ds.images[k], rows[0]
        for c, h, w in [(0, 0, 0), (1, 5, 7), (2, 31, 30), (0, 17, 2)]:
            assert image[h, w, c] == row[c * 1024 + h * 32 + w]
    assert np.array_equal(ds.images[0], rows0[0].reshape(3, 32, 32).transpose(1, 2, 0))
    assert ds.classes == data.CIFAR10_CLASSES

    test = data.load_cifar10("test")
    assert test.source.startswith("download cache")
    assert np.array_equal(test.images.reshape(3, -1), batches["test_batch"][0].reshape(3, 3, 1024)
                          .transpose(0, 2, 1).reshape(3, -1))
    assert set(data._read_sums(cache)) == {f"cifar10/train-{i}.npz" for i in range(5)} | {"cifar10/test.npz"}


def test_text_download_records_an_unpublished_checksum(monkeypatch, cache):
    text = "= Valkyria =\n the <unk> game \n"
    fake_downloads(monkeypatch, {"train.txt": text.encode()})
    ds = data.load_wikitext2("train")
    assert ds.text == text and ds.source.startswith("downloaded into the download cache")
    assert data._read_sums(cache)["wikitext-2/train.txt"] == hashlib.sha256(text.encode()).hexdigest()
    # the recorded sum protects the cached copy from now on
    (cache / "wikitext-2" / "train.txt").write_text(text.upper())
    with pytest.raises(DataError, match="checksum failed"):
        data.load_wikitext2("train")


def test_text_download_with_a_wrong_checksum(monkeypatch, cache):
    fake_downloads(monkeypatch, {"input.txt": b"not Shakespeare"})
    with pytest.raises(DataError, match="checksum failed for the download input.txt"):
        data.load_tinyshakespeare()
    assert not (cache / "tinyshakespeare" / "input.txt").exists()


class FakeResponse:
    def __init__(self, payload: bytes):
        self._body = io.BytesIO(payload)
        self.headers = {"Content-Length": str(len(payload))}

    def read(self, size=-1):
        return self._body.read(size)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_download_writes_the_file_and_skips_an_existing_one(monkeypatch, tmp_path):
    payload = bytes(range(256)) * 1000
    urls = []

    def urlopen(url, timeout=None):
        urls.append((url, timeout))
        return FakeResponse(payload)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    dest = tmp_path / "sub" / "file.bin"
    assert data._download("https://example.org/file.bin", dest) == dest
    assert dest.read_bytes() == payload
    assert urls == [("https://example.org/file.bin", data.DOWNLOAD_TIMEOUT_S)]
    assert [p.name for p in dest.parent.iterdir()] == ["file.bin"]  # no temporary file left
    data._download("https://example.org/file.bin", dest)
    assert len(urls) == 1


def test_published_digests_match_the_mirror(mirror):
    """The checksums a fresh download is checked against are those of the mirror's files."""
    sums = data._read_sums(mirror)
    assert sums["tinyshakespeare/input.txt"] == data.SHAKESPEARE_SHA256
    for file in ("valid.txt", "test.txt"):
        assert sums[f"wikitext-2/{file}"] == data.WIKITEXT2_SHA256[file]


# ------------------------------------------------------------------- broken layouts are DataErrors

def test_an_npz_without_the_expected_arrays(tmp_path, monkeypatch, cache):
    mirror = tmp_path / "mirror"
    (mirror / "mnist").mkdir(parents=True)
    np.savez(mirror / "mnist" / "test.npz", pictures=np.zeros((2, 28, 28), np.uint8))
    monkeypatch.setenv("BOOK_DATA", str(mirror))
    with pytest.raises(DataError) as err:
        data.load_mnist("test")
    message = str(err.value)
    assert str(mirror / "mnist" / "test.npz") in message
    assert "images, labels" in message and "pictures" in message and "copy it again" in message


def test_a_cifar_shard_without_class_names(tmp_path, monkeypatch, cache):
    mirror = tmp_path / "mirror"
    (mirror / "cifar10").mkdir(parents=True)
    np.savez(mirror / "cifar10" / "test.npz", images=np.zeros((2, 32, 32, 3), np.uint8),
             labels=np.zeros(2, np.uint8))
    monkeypatch.setenv("BOOK_DATA", str(mirror))
    with pytest.raises(DataError, match=r"test\.npz lacks the array\(s\) classes"):
        data.load_cifar10("test")


@pytest.mark.parametrize("sums, expected", [
    (b"not a checksum line\n", "line 1"),
    (b"\n" + b"ab" * 32 + b"\n", "line 2"),                              # a digest without a path
    (b"xyz  tinyshakespeare/input.txt\n", "line 1"),                     # not 64 hex digits
    (b"\xff\xfe" + "a  b\n".encode("utf-16-le"), "not UTF-8"),
])
def test_a_malformed_sha256sums(mirror, tmp_path, monkeypatch, cache, sums, expected):
    broken = tmp_path / "mirror"
    copy_files(mirror, broken, ["tinyshakespeare/input.txt"])
    (broken / "SHA256SUMS").write_bytes(sums)
    monkeypatch.setenv("BOOK_DATA", str(broken))
    with pytest.raises(DataError) as err:
        data.load_tinyshakespeare()
    message = str(err.value)
    assert str(broken / "SHA256SUMS") in message and expected in message
    assert "Restore it" in message


@pytest.mark.parametrize("listed", [True, False])
def test_a_directory_where_a_file_is_listed(mirror, tmp_path, monkeypatch, cache, listed):
    broken = tmp_path / "mirror"
    if listed:
        copy_files(mirror, broken, ["SHA256SUMS"])
    (broken / "tinyshakespeare" / "input.txt").mkdir(parents=True)
    monkeypatch.setenv("BOOK_DATA", str(broken))
    with pytest.raises(DataError) as err:
        data.load_tinyshakespeare()
    message = str(err.value)
    assert f"{broken / 'tinyshakespeare' / 'input.txt'} is a directory" in message
    assert "Remove it" in message


def test_without_sha256sums_the_published_digests_are_checked(mirror, tmp_path, monkeypatch, cache):
    """A mirror with no SHA256SUMS: the files whose published digest the library knows are still
    checked; the .npz conversions, which have none, load unchecked (their arrays are checked)."""
    bare = tmp_path / "mirror"
    copy_files(mirror, bare, ["tinyshakespeare/input.txt", "wikitext-2/test.txt", "gpt2/vocab.json",
                              "gpt2/merges.txt", "mnist/test.npz"])
    monkeypatch.setenv("BOOK_DATA", str(bare))
    assert len(data.load_tinyshakespeare().text) == 1_115_394
    assert len(data.load_mnist("test")) == 10_000
    for rel in ("tinyshakespeare/input.txt", "wikitext-2/test.txt", "gpt2/merges.txt"):
        target = bare / rel
        raw = bytearray(target.read_bytes())
        raw[500] = ord("#") if raw[500] != ord("#") else ord("@")
        target.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="checksum failed.*published digest"):
        data.load_tinyshakespeare()
    with pytest.raises(DataError, match="checksum failed.*published digest"):
        data.load_wikitext2("test")
    with pytest.raises(DataError, match="checksum failed.*published digest"):
        data.gpt2_tokenizer_files()
    assert set(data.PUBLISHED_SHA256) == {"tinyshakespeare/input.txt", "wikitext-2/valid.txt",
                                          "wikitext-2/test.txt", "gpt2/vocab.json",
                                          "gpt2/merges.txt"}


def test_published_digest_table_equals_the_mirror_sums(mirror):
    sums = data._read_sums(mirror)
    for rel, digest in data.PUBLISHED_SHA256.items():
        assert sums[rel] == digest, rel


def test_gpt2_tokenizer_files_from_the_mirror(with_mirror):
    vocab, merges = data.gpt2_tokenizer_files()
    assert vocab == with_mirror / "gpt2" / "vocab.json"
    assert merges == with_mirror / "gpt2" / "merges.txt"
    assert merges.read_text(encoding="utf-8").startswith("#version")


def test_gpt2_tokenizer_files_download_is_checked(monkeypatch, cache):
    fetched = fake_downloads(monkeypatch, {"vocab.json": b'{"a": 0}',
                                           "merges.txt": b"#version: 0.2\n"})
    with pytest.raises(DataError, match="checksum failed for the download vocab.json"):
        data.gpt2_tokenizer_files()
    assert fetched == [data.GPT2_URL + "vocab.json"]
    assert not (cache / "gpt2" / "vocab.json").exists()
