"""What a model family is to the rest of jaxformer: one :class:`Task` object.

A task owns everything that differs between families: which model class a config
builds, which dataset feeds it and what its batches hold (what ``jaxformer plan``
compiles against), the token loss and held-out statistics, extra evaluation (BLEU), how
it generates, what it counts in FLOPs, and which config keys it honours. Everything
else (the train step, setup, checkpoints, the command line) asks the task and never
compares ``model.family``. The registry (``registry.py``) maps ``model.family`` to it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from jaxformer import data as jdata
from jaxformer import flops
from jaxformer.attention.reference import EINSUM, Einsum
from jaxformer.config.schema import base_config
from jaxformer.errors import ConfigError
from jaxformer.losses import cross_entropy
from jaxformer.model.config import ModelConfig

Batch = dict[str, Any]
Stats = dict[str, jax.Array]


def hosts(cfg: ml_collections.ConfigDict, repeat: bool) -> dict[str, Any]:
    """The arguments every dataset factory takes: this process's share of each global
    batch, the shuffle seed, and whether to repeat (training) or stop (evaluation)."""
    return dict(
        global_batch=cfg.train.global_batch,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        seed=cfg.data.shuffle_seed,
        repeat=repeat,
    )


def is_pair_data(data_cfg: ml_collections.ConfigDict) -> bool:
    """Whether the data is source/target pairs (reverse_words, or tfds with source_key)."""
    return data_cfg.name == "reverse_words" or (
        data_cfg.name == "tfds" and bool(data_cfg.source_key)
    )


def is_labelled_data(data_cfg: ml_collections.ConfigDict) -> bool:
    """Whether the data is labelled examples (stdlib_packages, or tfds with label_key)."""
    return data_cfg.name == "stdlib_packages" or (
        data_cfg.name == "tfds" and bool(data_cfg.label_key)
    )


@dataclasses.dataclass(frozen=True)
class Task:
    """A model family. Subclasses set the class attributes and override what differs."""

    name: str  # the model.family value it is registered under
    model_class: type[nnx.Module]
    # What the family supports, read by the validators of other features:
    causal_lm: bool = False  # next-token decoder: splash, chunked loss, pipeline stages
    pipelines: bool = False  # its layers split into pipeline stages (mesh.stage > 1)
    unrolls_layers: bool = False  # honours model.scan_layers=False
    trains_on_pairs: bool = False  # source/target pairs rather than plain text
    seq2seq: bool = False  # an encoder and a decoder: generates a target from a source
    classifies: bool = False  # model.num_labels > 0 gives a sequence classifier
    next_sentence: bool = False  # data.nsp pre-trains next-sentence prediction
    generates: bool = True  # `jaxformer generate` and attention maps of a continuation
    reserved_ids: int = 0  # ids after the tokenizer's vocabulary (BERT [MASK], T5 sentinels)
    reserved_what: str = ""
    # Config keys the family's model and data never read: a value other than the
    # schema's default is refused rather than silently ignored.
    ignored_keys: tuple[str, ...] = ()

    # -- the model --------------------------------------------------------------------

    def build_model(
        self, model_cfg: ml_collections.ConfigDict, seed: int, attention: Einsum = EINSUM
    ) -> nnx.Module:
        """The family's model with parameters drawn from ``seed``, calling ``attention``."""
        cfg = ModelConfig.from_config(model_cfg, attention)
        return self.model_class(cfg, nnx.Rngs(params=seed))

    def count_flops(self, model_cfg: Any, seq_len: int) -> flops.FlopCount:
        """Parameters and training FLOPs per token (jaxformer/flops.py's convention)."""
        return flops.count(model_cfg, seq_len)

    # -- data -------------------------------------------------------------------------

    def dataset(self, cfg: ml_collections.ConfigDict, split: str, repeat: bool) -> Any:
        """This process's batches of ``split`` (a grain IterDataset)."""
        return jdata.make_dataset(
            cfg.data, split=split, seq_len=cfg.data.seq_len, **hosts(cfg, repeat)
        )

    def batch_lengths(self, cfg: ml_collections.ConfigDict) -> dict[str, int]:
        """Each key of a training batch and its length (rows are ``train.global_batch``)."""
        return {key: cfg.data.seq_len for key in jdata.BATCH_KEYS}

    # -- loss and evaluation -----------------------------------------------------------

    def token_loss(
        self, model: nnx.Module, batch: Batch, key: jax.Array | None, train_cfg: Any
    ) -> tuple[jax.Array, Stats, dict[str, Any]]:
        """The summed token loss, its summed statistics and the model's aux values."""
        logits, aux = model.apply_batch(batch, key)
        loss, stats = cross_entropy(
            logits, batch["targets"], batch["weights"],
            label_smoothing=train_cfg.label_smoothing, z_loss=train_cfg.z_loss,
        )  # fmt: skip
        return loss, stats, aux

    def eval_stats(
        self, model: nnx.Module, batch: Batch, train_cfg: Any
    ) -> tuple[Stats, dict[str, Any]]:
        """Summed held-out statistics (no dropout, no smoothing) and the aux values."""
        logits, aux = model.apply_batch(batch)
        _, stats = cross_entropy(logits, batch["targets"], batch["weights"])
        return stats, aux

    def extra_metrics(
        self, cfg: ml_collections.ConfigDict, model: nnx.Module, tokenizer: Any, step: int
    ) -> dict[str, float]:
        """Evaluation beyond the token statistics (BLEU), run with the mesh active."""
        return {}

    # -- generation -------------------------------------------------------------------

    def generation_inputs(
        self, tokenizer: Any, text: np.ndarray
    ) -> tuple[np.ndarray, tuple[np.ndarray, None] | None]:
        """``(prompt, sources)`` for ``jaxformer generate``: a decoder continues
        ``[bos] + text``; a sequence-to-sequence family translates ``text`` instead."""
        if not self.generates:
            raise ConfigError(
                f"model.family={self.name!r} does not generate text (no decoder); "
                "use jaxformer eval"
            )
        return np.concatenate([[tokenizer.bos_id], text]).astype(np.int32), None

    def text_row(self, tokenizer: Any, text: np.ndarray) -> dict[str, np.ndarray]:
        """One unpacked row of model inputs for ``text`` (attention maps, probes)."""
        ids = np.concatenate([[tokenizer.bos_id], text]).astype(np.int32)
        return unpacked_row(ids)

    # -- validation -------------------------------------------------------------------

    def validate(self, cfg: ml_collections.ConfigDict, mesh: dict[str, int]) -> None:
        """The family's checks of a config: the data it trains on, its objectives, and
        keys it would ignore."""
        m, d, t = cfg.model, cfg.data, cfg.train
        if self.trains_on_pairs != is_pair_data(d):
            raise ConfigError(
                f"config key 'model.family' ({m.family!r}) does not match the data "
                f"(data.name={d.name!r}, data.source_key={d.source_key!r}): "
                "encoder_decoder models train on source/target pairs (reverse_words, or tfds "
                "with data.source_key and data.target_key), decoders on plain text"
            )
        if m.num_labels < 0 or (m.num_labels and not self.classifies):
            raise ConfigError(
                f"config key 'model.num_labels' ({m.num_labels}) must be 0, or positive with "
                f"model.family='bert' (got {m.family!r})"
            )
        if is_labelled_data(d) != (m.num_labels > 0):
            raise ConfigError(
                f"config key 'model.num_labels' ({m.num_labels}) does not match the data "
                f"(data.name={d.name!r}, data.label_key={d.label_key!r}): a classifier trains "
                "on labelled data (stdlib_packages, or tfds with data.label_key), pre-training "
                "on plain text"
            )
        if d.nsp and (not self.next_sentence or m.num_labels):
            raise ConfigError(
                "config key 'data.nsp' (next-sentence prediction) needs model.family='bert' "
                f"and model.num_labels=0 (got {m.family!r}, {m.num_labels})"
            )
        if not m.scan_layers and not self.unrolls_layers:
            raise ConfigError(
                f"config key 'model.scan_layers' (False) is not supported by "
                f"model.family={m.family!r}, whose layers are always scanned; remove it"
            )
        if t.loss_chunk and (not self.causal_lm or mesh.get("stage", 1) > 1):
            raise ConfigError(
                "config key 'train.loss_chunk' works for model.family='decoder' without "
                f"pipelining; got family '{m.family}', mesh.stage {mesh.get('stage', 1)}"
            )
        check_ignored(cfg, self.ignored_keys, self.name)


def check_ignored(cfg: ml_collections.ConfigDict, keys: tuple[str, ...], family: str) -> None:
    """Refuses any of ``keys`` set to other than the schema's default: the family would
    ignore it, so the run would not be the experiment the config describes."""
    schema = base_config()
    for key in keys:
        section, _, leaf = key.partition(".")
        value, default = cfg[section][leaf], schema[section][leaf]
        if value != default:
            raise ConfigError(
                f"config key '{key}' ({value!r}) does nothing for model.family={family!r}; "
                f"remove it (its default is {default!r})"
            )


def unpacked_row(ids: np.ndarray) -> dict[str, np.ndarray]:
    """Model inputs for one unpacked sequence: one segment, positions from 0."""
    n = len(ids)
    return {
        "inputs": np.asarray(ids, np.int32)[None],
        "segment_ids": np.ones((1, n), np.int32),
        "positions": np.arange(n, dtype=np.int32)[None],
    }
