"""Data: tokenizers, the local-text TFDS builder and the grain input pipeline."""

from jaxformer.data.errors import DataError, MissingDataError
from jaxformer.data.pipeline import (
    BATCH_KEYS,
    bits_per_byte,
    count_target_bytes,
    load_documents,
    make_dataset,
)
from jaxformer.data.tokenizers import (
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
)

__all__ = [
    "BATCH_KEYS",
    "ByteTokenizer",
    "DataError",
    "MissingDataError",
    "SentencePieceTokenizer",
    "Tokenizer",
    "bits_per_byte",
    "build_tokenizer",
    "count_target_bytes",
    "load_documents",
    "make_dataset",
]
