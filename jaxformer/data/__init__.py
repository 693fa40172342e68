"""Data: tokenizers, the local-text TFDS builder and the grain LM and seq2seq pipelines."""

from jaxformer.data.bert_tasks import (
    load_examples,
    make_classification_dataset,
    make_nsp_dataset,
)
from jaxformer.data.lm_dataset import (
    BATCH_KEYS,
    bits_per_byte,
    count_target_bytes,
    load_documents,
    make_dataset,
)
from jaxformer.data.seq2seq import (
    SEQ2SEQ_BATCH_KEYS,
    corpus_bleu,
    decode_batch,
    decode_until_eos,
    load_pairs,
    make_seq2seq_dataset,
    make_span_corruption_dataset,
    reverse_words_pairs,
    reverse_words_target,
)
from jaxformer.data.tokenizers import (
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
)
from jaxformer.errors import DataError, MissingDataError

__all__ = [
    "BATCH_KEYS",
    "ByteTokenizer",
    "DataError",
    "MissingDataError",
    "SEQ2SEQ_BATCH_KEYS",
    "SentencePieceTokenizer",
    "Tokenizer",
    "bits_per_byte",
    "build_tokenizer",
    "corpus_bleu",
    "count_target_bytes",
    "decode_batch",
    "decode_until_eos",
    "load_documents",
    "load_examples",
    "make_classification_dataset",
    "load_pairs",
    "make_dataset",
    "make_nsp_dataset",
    "make_seq2seq_dataset",
    "make_span_corruption_dataset",
    "reverse_words_pairs",
    "reverse_words_target",
]
