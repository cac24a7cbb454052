"""Textual-inversion vectors in a CLIP text encoder's input, without changing its vocabulary.

An `EmbeddingTable` holds named embeddings, each [n, C] vectors. A prompt uses one by its name: the name's BPE ids
(as the prompt's own text tokenizes them) are replaced by n *placeholder ids* >= the vocabulary size, unique to that
embedding, and the encoder writes the vectors into its token-embedding output at those positions before the
transformer runs (the AUTOMATIC1111 web UI's EmbeddingsWithFixes, done with a forward hook held for one call).
The placeholder ids are ordinary ints in the 77-token chunk rows, so chunks that use different embeddings (or a
file reloaded with new vectors) never share a cache entry, and a prompt that uses none gives exactly the rows, and
the conditioning, it gave before.

File formats, folders and hashes are `microbatch.embeddings`' concern; this module only matches and substitutes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

# The most vectors one embedding may have: it must fit in one 75-token chunk (it never straddles a chunk boundary).
MAX_VECTORS = 75

TokenItem = Union[int, tuple[int, ...]]  # a BPE id, or the placeholder ids of one embedding (kept together)


@dataclass(frozen=True)
class TableEntry:
    """One embedding in a table.

    Attributes:
        name: what prompts write to use it (a file's stem).
        name_ids: the name's BPE ids, matched in a prompt's tokens.
        vectors: [n, C] float32 on the CPU.
        ids: its n placeholder ids (>= the vocabulary size), unique to this entry.
        info: whatever the loader keeps about it (file, hash, training step...).
    """

    name: str
    name_ids: tuple[int, ...]
    vectors: torch.Tensor
    ids: tuple[int, ...]
    info: Any = None


class EmbeddingTable:
    """Named embeddings a text encoder substitutes for their names in prompts.

    Args:
        vocab_size: the token-embedding rows; placeholder ids start here.
        width: C, the token-embedding width every entry's vectors must have.
    """

    def __init__(self, vocab_size: int, width: int):
        self.vocab_size = int(vocab_size)
        self.width = int(width)
        self._entries: dict[str, TableEntry] = {}
        self._by_first_id: dict[int, list[TableEntry]] = {}
        self._vectors: dict[int, torch.Tensor] = {}  # placeholder id -> [C]
        self._owner: dict[int, str] = {}  # placeholder id -> entry name
        self._next_id = self.vocab_size
        # bumped on every change: caches of encoded text key on it
        self.version = 0
        # for the loader: embeddings it kept out of the table (name -> its record), and what it last loaded from
        self.skipped: dict[str, Any] = {}
        self.source: Any = None

    # -- contents --
    def add(self, name: str, name_ids: Sequence[int], vectors: torch.Tensor, info: Any = None) -> TableEntry:
        """Add (or replace) the embedding `name`. vectors [n, C] or [C]; ValueError when the width is not the
        table's, n is not 1..MAX_VECTORS, the name has no tokens, or the vectors are not finite."""
        vectors = vectors.detach().to(device="cpu", dtype=torch.float32)
        if vectors.ndim == 1:
            vectors = vectors.unsqueeze(0)
        if vectors.ndim != 2 or vectors.shape[-1] != self.width:
            raise ValueError(f"embedding {name!r} has shape {tuple(vectors.shape)}; this text encoder needs [n, {self.width}]")
        if not 1 <= vectors.shape[0] <= MAX_VECTORS:
            raise ValueError(f"embedding {name!r} has {vectors.shape[0]} vectors; 1 to {MAX_VECTORS} fit in a prompt chunk")
        if not bool(torch.isfinite(vectors).all()):
            raise ValueError(f"embedding {name!r} has values that are not finite")
        name_ids = tuple(int(i) for i in name_ids)
        if not name_ids:
            raise ValueError(f"embedding name {name!r} has no tokens a prompt could match")
        self.remove(name)
        ids = tuple(range(self._next_id, self._next_id + vectors.shape[0]))
        self._next_id += len(ids)
        entry = TableEntry(name, name_ids, vectors.contiguous(), ids, info)
        self._entries[name] = entry
        for i, row in zip(ids, entry.vectors):
            self._vectors[i] = row
            self._owner[i] = name
        # longest names first, so "style-2" wins over "style" where both match (the web UI's order)
        matches = self._by_first_id.setdefault(name_ids[0], [])
        matches.append(entry)
        matches.sort(key=lambda e: len(e.name_ids), reverse=True)
        self.version += 1
        return entry

    def remove(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is None:
            return
        for i in entry.ids:
            del self._vectors[i], self._owner[i]
        matches = self._by_first_id[entry.name_ids[0]]
        matches.remove(entry)
        if not matches:
            del self._by_first_id[entry.name_ids[0]]
        self.version += 1

    def clear(self) -> None:
        for name in list(self._entries):
            self.remove(name)

    @property
    def entries(self) -> dict[str, TableEntry]:
        """name -> entry (a copy)."""
        return dict(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    # -- prompts --
    def match(self, ids: Sequence[int], pos: int) -> Optional[TableEntry]:
        """The entry whose name's ids start at ids[pos] (the longest when several do), or None."""
        for entry in self._by_first_id.get(ids[pos], ()):
            n = len(entry.name_ids)
            if tuple(ids[pos : pos + n]) == entry.name_ids:
                return entry
        return None

    def substitute(self, ids: Sequence[int]) -> list[TokenItem]:
        """A fragment's BPE ids with each embedding name replaced by a tuple of that embedding's placeholder ids.
        Without a match the list equals `ids`."""
        if not self._by_first_id:
            return list(ids)
        out: list[TokenItem] = []
        pos = 0
        while pos < len(ids):
            entry = self.match(ids, pos)
            if entry is None:
                out.append(ids[pos])
                pos += 1
            else:
                out.append(entry.ids)
                pos += len(entry.name_ids)
        return out

    def names_in(self, rows: Sequence[Sequence[int]]) -> list[str]:
        """Names of the entries whose placeholders appear in token rows, in order of first appearance."""
        seen: dict[str, None] = {}
        for row in rows:
            for i in row:
                if i >= self.vocab_size and i in self._owner:
                    seen.setdefault(self._owner[i], None)
        return list(seen)

    def vectors_for(self, placeholder_ids: Sequence[int]) -> torch.Tensor:
        """[len(ids), C] float32 rows of the given placeholder ids (KeyError for an id no entry owns: a row
        tokenized before its embedding was removed)."""
        return torch.stack([self._vectors[int(i)] for i in placeholder_ids])
