"""The schema: every config key jaxformer knows, with its default, type and choices.

Every experiment file under configs/ defines ``get_config()`` and starts from
:func:`base_config`. Anything outside it is an error, so a typo never silently trains
the wrong model. What a value means for the rest of the config (a mesh that fits the
devices, a family that honours a key) is checked by each feature's own validator,
run together by :func:`jaxformer.validation.validate`.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import ml_collections

from jaxformer.errors import ConfigError

# The device mesh's axes, in mesh order: the one definition (config keys mesh.AXIS and
# mesh.dcn_AXIS, jaxformer.parallel's meshes and rules).
MESH_AXES = ("stage", "data", "fsdp", "expert", "sequence", "tensor")


def _section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(type_safe=False)


def base_config() -> ml_collections.ConfigDict:
    """The schema and defaults: a small byte-level decoder LM on the built-in corpus.

    Type safety is jaxformer's (``check_schema``), not ml_collections', so a config file
    that assigns a wrong type gets the same message, naming the full key, as an override.
    """
    c = _section()

    c.model = _section()
    m = c.model
    # decoder | encoder_decoder | bert | t5, or any family registered in jaxformer/tasks/
    m.family = "decoder"
    m.vocab_size = 384  # byte tokenizer (259 ids) padded up to a multiple of 128
    m.d_model = 128
    m.num_layers = 4  # decoder layers
    m.num_encoder_layers = 0  # encoder_decoder: encoder layers; 0 = num_layers
    m.num_heads = 4
    m.num_kv_heads = 0  # 0 means num_heads (MHA); fewer gives GQA, 1 gives MQA
    m.head_dim = 0  # 0 means d_model // num_heads
    m.d_ff = 512
    m.max_len = 256  # longest sequence the positions support
    m.position = "rope"  # rope | learned | sinusoidal | alibi | none
    m.rope_base = 10000.0
    m.norm = "rmsnorm"  # rmsnorm | layernorm
    m.norm_position = "pre"  # pre | post
    m.norm_eps = 1e-6
    m.mlp = "swiglu"  # swiglu | geglu | gelu (tanh) | gelu_exact (erf) | relu
    m.use_bias = False
    m.tie_embeddings = True
    m.scale_embeddings = False  # multiply embeddings by sqrt(d_model) (Vaswani et al.)
    m.scale_attention = True  # divide logits by sqrt(head_dim); T5 does not
    m.type_vocab_size = 2  # bert: segment (token type) embeddings
    m.num_labels = 0  # bert: classes of a sequence-classification head; 0 = pre-training
    m.relative_buckets = 32  # t5: relative position buckets
    m.relative_max_distance = 128  # t5: distance beyond which buckets saturate
    m.dropout = 0.0
    m.scan_layers = True
    # What the backward keeps (docs/performance.md):
    m.remat = "none"  # none | full | dots | dots_no_batch | dots_attention | qkv
    # auto (dot_product where cuDNN runs, else einsum) | einsum (reference)
    # | dot_product (jax.nn, cuDNN on GPU) | splash (Pallas, TPU, decoders)
    m.attention_impl = "auto"
    m.sliding_window = 0  # attend only to the last N positions; 0 = unlimited
    m.moe_experts = 0  # experts per MoE MLP; 0 = dense MLP
    m.moe_top_k = 2  # experts each token is routed to
    m.moe_capacity_factor = 1.25  # expert capacity = factor * tokens * top_k / experts
    m.moe_d_ff = 0  # hidden width of each expert; 0 = d_ff
    m.moe_aux_loss = 0.01  # Switch load-balancing loss weight
    m.moe_z_loss = 0.001  # ST-MoE router z-loss weight
    m.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
    m.param_dtype = "float32"
    m.init_std = 0.02

    c.data = _section()
    d = c.data
    d.name = "stdlib"  # stdlib | text_files | tfds | reverse_words (built-in seq2seq task)
    # | stdlib_packages (built-in classification task, jaxformer/data/bert_tasks.py)
    d.paths = ""  # glob(s) for text_files, comma separated
    d.tfds_name = ""
    d.text_key = "text"
    d.train_split = "train"
    d.eval_split = "eval"
    d.eval_fraction = 0.02
    d.data_dir = ""  # '' means $JAXFORMER_DATA_DIR or ~/.cache/jaxformer/tfds
    d.tokenizer = "byte"  # byte | sentencepiece
    d.spm_model = ""
    d.shuffle_seed = 0
    d.worker_count = 0
    d.seq_len = 256  # decoder-side (target) tokens per row
    # Sequence-to-sequence data (model.family = encoder_decoder):
    d.source_seq_len = 0  # encoder-side tokens per row; 0 = seq_len
    d.source_key = ""  # feature holding the source text, e.g. 'de' for wmt14_translate/de-en
    d.target_key = ""  # feature holding the target text, e.g. 'en'
    # BERT (model.family = bert):
    d.nsp = False  # pre-train on [CLS] A [SEP] B [SEP] pairs with next-sentence prediction
    d.label_key = ""  # tfds classification: the integer label feature, e.g. 'label'
    d.text_pair_key = ""  # tfds classification: a second text (segment B), e.g. 'hypothesis'

    c.optimizer = _section()
    o = c.optimizer
    o.name = "adamw"  # adamw | adafactor
    o.lr = 3e-3
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.weight_decay = 0.1
    o.clip_norm = 1.0  # 0 disables clipping
    o.schedule = "cosine"  # constant | linear | cosine | wsd | rsqrt
    o.warmup_steps = 50
    o.min_lr_ratio = 0.1  # floor of cosine/linear/wsd decay, as a fraction of lr
    o.decay_fraction = 0.2  # wsd: share of the run spent decaying
    o.rsqrt_scale = 1.0  # rsqrt: lr = scale * d_model^-0.5 * min(t^-0.5, t * warmup^-1.5)

    c.train = _section()
    t = c.train
    t.steps = 300
    t.global_batch = 16
    t.microbatches = 1  # gradient accumulation: the global batch is split into this many
    t.pipeline_schedule = "gpipe"  # gpipe | 1f1b, with mesh.stage > 1 (docs/parallelism.md)
    t.seed = 0
    t.label_smoothing = 0.0
    t.z_loss = 0.0
    # Decoders: compute the output projection and loss this many positions at a time so
    # the [B, L, V] logits never exist whole (docs/performance.md); 0 = all at once.
    t.loss_chunk = 0
    t.log_every = 20
    t.eval_every = 100
    t.eval_batches = 8
    t.bleu_samples = 128  # encoder_decoder: eval pairs translated greedily for BLEU; 0 = off
    t.checkpoint_every = 100
    t.keep_checkpoints = 3
    t.run_dir = "runs/default"
    t.init_from = ""  # run dir whose latest checkpoint's weights start a fresh run (fine-tuning)
    t.async_checkpoints = True
    # Bad steps (train/guard.py, docs/reliability.md): a step with a NaN/Inf loss or
    # gradient is skipped; this many skipped in a row stop the run (0: never stop).
    t.max_bad_steps = 10
    t.spike_sigma = 0.0  # also skip losses this many std devs above the running mean; 0: off
    t.spike_warmup = 100  # steps of loss statistics before the spike guard acts
    t.tensorboard = True

    c.mesh = _section()
    # Devices per axis within a slice (TPU) or process (GPU, CPU): the fast ICI/NVLink links.
    c.mesh.stage = 1  # pipeline stages: the scanned layers split into consecutive groups
    c.mesh.data = -1  # -1: whatever the other axes leave
    c.mesh.fsdp = 1
    c.mesh.expert = 1  # MoE experts split over it; outside MoE layers it splits the batch
    c.mesh.sequence = 1  # splits every row along its length (ring attention)
    c.mesh.tensor = 1
    # mesh.dcn_AXIS: how many slices (or processes) the axis spans over the slow data-center
    # network; each mesh axis is ICI size x DCN size. Keep DCN to data (or fsdp) parallelism.
    for axis in MESH_AXES:
        c.mesh[f"dcn_{axis}"] = 1

    # Multi-process runs (docs/launch.md). One process per host (or per GPU), all started
    # with the same config; jax.distributed connects them before anything else runs.
    c.distributed = _section()
    dist = c.distributed
    dist.initialize = "auto"  # auto: when several processes are asked for | always | never
    dist.coordinator_address = ""  # host:port of process 0; '' = $JAX_COORDINATOR_ADDRESS
    dist.num_processes = 0  # 0 = $JAX_NUM_PROCESSES, else the cluster's (SLURM, TPU, ...)
    dist.process_id = -1  # -1 = $JAX_PROCESS_ID, else the cluster's
    dist.initialization_timeout = 300  # seconds to wait for every process to connect
    return c


CHOICES = {
    "model.position": ("rope", "learned", "sinusoidal", "alibi", "none"),
    "model.attention_impl": ("auto", "einsum", "dot_product", "splash"),
    "model.norm": ("rmsnorm", "layernorm"),
    "model.norm_position": ("pre", "post"),
    "model.mlp": ("swiglu", "geglu", "gelu", "gelu_exact", "relu"),
    "model.remat": ("none", "full", "dots", "dots_no_batch", "dots_attention", "qkv"),
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "data.name": ("stdlib", "text_files", "tfds", "reverse_words", "stdlib_packages"),
    "data.tokenizer": ("byte", "sentencepiece"),
    "optimizer.name": ("adamw", "adafactor"),
    "optimizer.schedule": ("constant", "linear", "cosine", "wsd", "rsqrt"),
    "distributed.initialize": ("auto", "always", "never"),
    "train.pipeline_schedule": ("gpipe", "1f1b"),
}


def _flatten(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _unknown_key_error(key: str, known: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _check_type(key: str, value: Any, default: Any) -> Any:
    """Returns value coerced to the schema's type, or raises naming the key."""
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise ConfigError(
        f"config key '{key}' must be {expected.__name__}, got {type(value).__name__} {value!r}"
    )


def check_schema(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks cfg has only schema keys with schema types; returns a locked, coerced copy."""
    schema = _flatten(base_config())
    given = _flatten(cfg)
    out = base_config()
    for key, value in given.items():
        if key not in schema:
            raise _unknown_key_error(key, list(schema))
        section, _, leaf = key.rpartition(".")
        out[section][leaf] = _check_type(key, value, schema[key])
    for key, choices in CHOICES.items():
        section, _, leaf = key.rpartition(".")
        if out[section][leaf] not in choices:
            raise ConfigError(
                f"config key '{key}' is {out[section][leaf]!r}; choose one of {list(choices)}"
            )
    out.lock()
    return out
