"""Tokenizers: a dependency-free byte tokenizer and a SentencePiece wrapper.

Both share one small interface (``encode``/``decode`` plus the special ids and a
``token_bytes`` table) so the pipeline and the eval loop never care which one is used.
Special ids are fixed across tokenizers: 0 = pad, 1 = bos, 2 = eos.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import sentencepiece as spm

from jaxformer.errors import DataError, MissingDataError

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2


class Tokenizer(Protocol):
    """What the pipeline and eval loop need from a tokenizer."""

    pad_id: int
    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...

    @property
    def token_bytes(self) -> np.ndarray: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (id = byte + 3): needs no training and never sees <unk>.

    Also makes bits-per-byte trivial, since every non-special token is one byte.
    """

    pad_id = PAD_ID
    bos_id = BOS_ID
    eos_id = EOS_ID
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str) -> np.ndarray:
        """Returns the UTF-8 bytes of ``text`` shifted past the specials (no bos/eos)."""
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return raw.astype(np.int32) + self.offset

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Drops special ids and decodes the rest; invalid UTF-8 becomes U+FFFD."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        arr = arr[(arr >= self.offset) & (arr < self.vocab_size)]
        return (arr - self.offset).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    @property
    def token_bytes(self) -> np.ndarray:
        """Bytes of text per id: 1 for every byte token, 0 for specials."""
        table = np.ones(self.vocab_size, dtype=np.int32)
        table[: self.offset] = 0
        return table

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class SentencePieceTokenizer:
    """Wraps a SentencePiece model trained with pad=0, bos=1, eos=2, unk=3.

    See ``tools/train_tokenizer.py``. The specials are checked at load time because a
    model with other ids would silently corrupt packing (segment padding uses id 0).
    """

    def __init__(self, model_path: str | os.PathLike[str]) -> None:
        self.model_path = os.fspath(model_path)
        if not os.path.isfile(self.model_path):
            raise MissingDataError(f"SentencePiece model not found: {self.model_path}")
        with open(self.model_path, "rb") as f:
            self._init_from_proto(f.read())

    def _init_from_proto(self, proto: bytes) -> None:
        self._proto = proto
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        self.pad_id = int(self._sp.pad_id())
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        self.vocab_size = int(self._sp.get_piece_size())
        got = (self.pad_id, self.bos_id, self.eos_id)
        if got != (PAD_ID, BOS_ID, EOS_ID):
            raise DataError(
                f"SentencePiece model {self.model_path} has (pad, bos, eos) = {got}; "
                f"jaxformer needs {(PAD_ID, BOS_ID, EOS_ID)}. Retrain it with "
                "tools/train_tokenizer.py."
            )
        self._control = np.array([self._sp.is_control(i) for i in range(self.vocab_size)])
        self._token_bytes: np.ndarray | None = None

    def encode(self, text: str) -> np.ndarray:
        """Returns the piece ids of ``text`` (no bos/eos)."""
        return np.asarray(self._sp.encode(text, out_type=int), dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Drops pad/bos/eos and decodes the rest."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        arr = arr[(arr >= 0) & (arr < self.vocab_size)]
        arr = arr[~self._control[arr]]
        return self._sp.decode(arr.tolist())

    @property
    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of text per id (byte-fallback pieces count 1, specials 0).

        Exact for models trained without a dummy prefix (as ours are); otherwise a
        document's leading '▁' is counted as one byte.
        """
        if self._token_bytes is None:
            table = np.zeros(self.vocab_size, dtype=np.int32)
            for i in range(self.vocab_size):
                if self._sp.is_byte(i):
                    table[i] = 1
                elif not (self._sp.is_control(i) or self._sp.is_unknown(i)):
                    piece = self._sp.id_to_piece(i).replace("\u2581", " ")
                    table[i] = len(piece.encode("utf-8"))
            self._token_bytes = table
        return self._token_bytes

    # SentencePieceProcessor is a SWIG object; pickle the model bytes instead so the
    # tokenizer can travel to grain worker processes.
    def __getstate__(self) -> dict[str, Any]:
        return {"model_path": self.model_path, "proto": self._proto}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.model_path = state["model_path"]
        self._init_from_proto(state["proto"])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def build_tokenizer(data_cfg: Any) -> ByteTokenizer | SentencePieceTokenizer:
    """Builds the tokenizer named by ``data_cfg.tokenizer`` ('byte' or 'sentencepiece')."""
    kind = data_cfg.tokenizer
    if kind == "byte":
        return ByteTokenizer()
    if kind == "sentencepiece":
        path = os.path.expanduser(str(data_cfg.get("spm_model", "") or ""))
        if not path:
            raise DataError(
                "data.tokenizer='sentencepiece' needs data.spm_model (a .model file); "
                "train one with `python tools/train_tokenizer.py --output-prefix PREFIX`."
            )
        if not os.path.isfile(path):
            raise MissingDataError(
                f"data.spm_model={path!r} does not exist; train one with "
                "`python tools/train_tokenizer.py --output-prefix PREFIX` and point "
                "data.spm_model at PREFIX.model."
            )
        return SentencePieceTokenizer(path)
    raise DataError(f"Unknown data.tokenizer={kind!r}; expected 'byte' or 'sentencepiece'.")
