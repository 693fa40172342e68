"""Experiment configs: the schema, loading a config file, command-line overrides and validation.

Every experiment file under configs/ defines ``get_config()`` and starts from
:func:`base_config`, which is the schema: it holds every key jaxformer knows with its
default and type. Anything outside it is an error, so a typo never silently trains
the wrong model. Validation runs before anything is compiled.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A config that cannot run; the message names the offending key."""


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
    m.family = "decoder"  # decoder | encoder_decoder | bert | t5
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


_CHOICES = {
    "model.family": ("decoder", "encoder_decoder", "bert", "t5"),
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

MESH_AXES = ("stage", "data", "fsdp", "expert", "sequence", "tensor")


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
    for key, choices in _CHOICES.items():
        section, _, leaf = key.rpartition(".")
        if out[section][leaf] not in choices:
            raise ConfigError(
                f"config key '{key}' is {out[section][leaf]!r}; choose one of {list(choices)}"
            )
    out.lock()
    return out


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as --config.model.norm=layernorm


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Applies ``--config.a.b=value`` (or ``a.b=value``) overrides in place."""
    known = list(_flatten(cfg))
    for item in overrides:
        text = item.removeprefix("--").removeprefix("config.")
        if "=" not in text:
            raise ConfigError(f"override '{item}' must look like --config.KEY=VALUE")
        key, raw = text.split("=", 1)
        if key not in known:
            raise _unknown_key_error(key, known)
        section, _, leaf = key.rpartition(".")
        target = cfg[section] if section else cfg
        value = _parse_value(raw)
        if isinstance(target[leaf], str) and not isinstance(value, str):
            value = raw  # a string field keeps its text: --config.train.run_dir=2024
        target[leaf] = _check_type(key, value, target[leaf])


def run_get_config(path: str, what: str = "config file") -> ml_collections.ConfigDict:
    """Runs ``get_config([arg])`` of the file ``path[:arg]``, unchecked; errors name the
    file as ``what`` (experiment configs, sweep specs)."""
    file, _, arg = path.partition(":")
    if not Path(file).is_file():
        raise ConfigError(f"{what} '{file}' does not exist")
    spec = importlib.util.spec_from_file_location(f"jaxformer_config_{Path(file).stem}", file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{what} '{file}' defines no get_config()")
    try:
        return module.get_config(arg) if arg else module.get_config()
    except (TypeError, AttributeError, KeyError) as err:  # ml_collections' type checks
        raise ConfigError(f"{what} '{file}': {err}") from err


def sibling_config(config_file: str, name: str) -> ml_collections.ConfigDict:
    """For a config file that names a preset defined in another file of its folder:
    ``sibling_config(__file__, "gpt2.py:124m")``."""
    return run_get_config(str(Path(config_file).with_name(name)))


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads ``get_config()`` from ``path[:arg]``, applies overrides and checks types."""
    cfg = run_get_config(path)
    cfg = check_schema(cfg)
    cfg.unlock()
    apply_overrides(cfg, overrides)
    return check_schema(cfg)


def resolve_mesh(
    mesh_cfg: ml_collections.ConfigDict, num_devices: int
) -> tuple[dict[str, int], dict[str, int]]:
    """The (ICI, DCN) sizes of every mesh axis, with at most one ICI -1 filled in.

    The DCN sizes (``mesh.dcn_AXIS``) multiply to the number of slices or processes the
    devices are grouped in; the ICI sizes (``mesh.AXIS``) cover the devices of one group.
    """
    dcn = {axis: int(mesh_cfg[f"dcn_{axis}"]) for axis in MESH_AXES}
    for axis, size in dcn.items():
        if size < 1:
            raise ConfigError(f"config key 'mesh.dcn_{axis}' must be >= 1, got {size}")
    groups = math.prod(dcn.values())
    dcn_keys = ", ".join(f"'mesh.dcn_{axis}'" for axis in MESH_AXES)
    if num_devices % groups:
        raise ConfigError(
            f"config keys {dcn_keys} multiply to {groups}, which does not divide the "
            f"{num_devices} devices"
        )
    per_group = num_devices // groups
    where = f"{num_devices} devices"
    if groups > 1:
        where = f"{per_group} devices per slice/process ({num_devices} in all)"
    sizes = {axis: int(mesh_cfg[axis]) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ConfigError(f"only one mesh axis may be -1, got {free}")
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"config key 'mesh.{axis}' must be positive or -1, got {size}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if per_group % fixed:
            raise ConfigError(
                f"mesh {sizes} cannot fill {where}: the fixed axes multiply to "
                f"{fixed}, which does not divide {per_group} (config key 'mesh.{free[0]}')"
            )
        sizes[free[0]] = per_group // fixed
    elif fixed != per_group:
        keys = ", ".join(f"'mesh.{axis}'" for axis in MESH_AXES)
        raise ConfigError(
            f"mesh {sizes} has {fixed} devices but there are {where}; "
            f"set config keys {keys} so their product matches (or use -1 for one of them)"
        )
    return sizes, dcn


def resolve_mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Mesh axis sizes (ICI x DCN) with at most one -1 filled in; raises if they do not
    cover the devices."""
    ici, dcn = resolve_mesh(mesh_cfg, num_devices)
    return {axis: ici[axis] * dcn[axis] for axis in MESH_AXES}


def check_dcn(mesh_cfg: ml_collections.ConfigDict, process_count: int, num_slices: int) -> None:
    """The DCN axes must span exactly the device groups the slow network joins: the TPU
    slices when there are several, else the processes (one per host)."""
    groups = math.prod(int(mesh_cfg[f"dcn_{axis}"]) for axis in MESH_AXES)
    keys = ", ".join(f"'mesh.dcn_{axis}'" for axis in MESH_AXES)
    if num_slices > 1:
        if groups != num_slices:
            raise ConfigError(
                f"the devices span {num_slices} TPU slices but config keys {keys} multiply "
                f"to {groups}; set them so their product is {num_slices} (e.g. "
                f"--config.mesh.dcn_data={num_slices})"
            )
    elif groups > 1 and groups != process_count:
        raise ConfigError(
            f"config keys {keys} multiply to {groups} but the run has {process_count} "
            f"process(es); without TPU slices each DCN group is one process, so their product "
            f"must be {process_count} (or 1 for a mesh without DCN axes)"
        )


def _validate_bert_task(cfg: ml_collections.ConfigDict) -> None:
    """BERT's objectives: classification needs labelled data and labelled data needs a
    classifier; next-sentence prediction is a pre-training objective."""
    m, d = cfg.model, cfg.data
    labelled = d.name == "stdlib_packages" or (d.name == "tfds" and bool(d.label_key))
    if m.num_labels < 0 or (m.num_labels and m.family != "bert"):
        raise ConfigError(
            f"config key 'model.num_labels' ({m.num_labels}) must be 0, or positive with "
            f"model.family='bert' (got {m.family!r})"
        )
    if labelled != (m.num_labels > 0):
        raise ConfigError(
            f"config key 'model.num_labels' ({m.num_labels}) does not match the data "
            f"(data.name={d.name!r}, data.label_key={d.label_key!r}): a classifier trains "
            "on labelled data (stdlib_packages, or tfds with data.label_key), pre-training "
            "on plain text"
        )
    if d.nsp and (m.family != "bert" or m.num_labels):
        raise ConfigError(
            "config key 'data.nsp' (next-sentence prediction) needs model.family='bert' "
            f"and model.num_labels=0 (got {m.family!r}, {m.num_labels})"
        )


def _validate_pipeline(cfg: ml_collections.ConfigDict, mesh: dict[str, int]) -> None:
    """Pipeline parallelism (mesh.stage > 1) splits a decoder's scanned layers into equal
    stages and runs train.microbatches through them (jaxformer/parallel/pipeline.py)."""
    m, t, stages = cfg.model, cfg.train, mesh["stage"]
    if stages == 1:
        return
    where = f"with mesh.stage x mesh.dcn_stage = {stages} pipeline stages"
    if m.family != "decoder" or not m.scan_layers or m.moe_experts:
        raise ConfigError(
            f"config keys 'model.family' ({m.family!r}), 'model.scan_layers' "
            f"({m.scan_layers}) and 'model.moe_experts' ({m.moe_experts}) {where}: "
            "pipelining needs a dense decoder with scanned layers (family='decoder', "
            "scan_layers=True, moe_experts=0); use mesh.stage=1 for the others"
        )
    if m.num_layers % stages:
        raise ConfigError(
            f"config key 'model.num_layers' ({m.num_layers}) must divide by the {stages} "
            "pipeline stages (mesh.stage x mesh.dcn_stage)"
        )
    if mesh.get("sequence", 1) > 1:
        raise ConfigError(
            f"config key 'mesh.sequence' ({mesh['sequence']}) must be 1 {where}: ring "
            "attention is not combined with pipelining yet"
        )
    if t.pipeline_schedule == "1f1b" and t.microbatches < stages:
        raise ConfigError(
            f"config key 'train.microbatches' ({t.microbatches}) must be at least the "
            f"{stages} pipeline stages for train.pipeline_schedule='1f1b'"
        )


def _validate_splash(cfg: ml_collections.ConfigDict, mesh: dict[str, int]) -> None:
    """What the Pallas splash kernel (jaxformer/model/splash_attention.py) cannot run."""
    m = cfg.model
    if m.attention_impl != "splash":
        return
    from jaxformer.model import splash_attention  # Pallas: imported only when asked for

    problem = None
    if m.family != "decoder":
        problem = f"is wired for decoders only (model.family={m.family!r})"
    elif m.position == "alibi":
        problem = "takes no logit bias (model.position='alibi')"
    elif cfg.data.seq_len % splash_attention.MIN_BLOCK:
        problem = (
            f"needs data.seq_len a multiple of {splash_attention.MIN_BLOCK} "
            f"(got {cfg.data.seq_len})"
        )
    elif mesh["sequence"] > 1:
        problem = "does not split the sequence (mesh.sequence > 1: ring attention does)"
    elif mesh["stage"] > 1:
        problem = "is not wired into pipeline stages (mesh.stage > 1)"
    if problem:
        raise ConfigError(
            f"config key 'model.attention_impl'='splash' {problem}; "
            "use model.attention_impl=dot_product or einsum"
        )


def validate(
    cfg: ml_collections.ConfigDict, num_devices: int, process_count: int = 1, num_slices: int = 1
) -> dict[str, int]:
    """Checks what needs the device count; returns the resolved mesh shape (ICI x DCN)."""
    mesh = resolve_mesh_shape(cfg.mesh, num_devices)
    check_dcn(cfg.mesh, process_count, num_slices)
    m, t = cfg.model, cfg.train
    num_kv = m.num_kv_heads or m.num_heads
    if m.num_heads % num_kv:
        raise ConfigError(
            f"config key 'model.num_kv_heads' ({num_kv}) must divide model.num_heads "
            f"({m.num_heads})"
        )
    if not m.head_dim and m.d_model % m.num_heads:
        raise ConfigError(
            f"config key 'model.num_heads' ({m.num_heads}) must divide model.d_model "
            f"({m.d_model}) unless model.head_dim is set"
        )
    seq2seq_data = cfg.data.name == "reverse_words" or (
        cfg.data.name == "tfds" and bool(cfg.data.source_key)
    )
    if (m.family == "encoder_decoder") != seq2seq_data:
        raise ConfigError(
            f"config key 'model.family' ({m.family!r}) does not match the data "
            f"(data.name={cfg.data.name!r}, data.source_key={cfg.data.source_key!r}): "
            "encoder_decoder models train on source/target pairs (reverse_words, or tfds "
            "with data.source_key and data.target_key), decoders on plain text"
        )
    _validate_bert_task(cfg)
    _validate_pipeline(cfg, mesh)
    if cfg.data.source_seq_len > m.max_len:
        raise ConfigError(
            f"config key 'data.source_seq_len' ({cfg.data.source_seq_len}) is above the "
            f"model's limit model.max_len ({m.max_len})"
        )
    if cfg.data.seq_len > m.max_len:
        raise ConfigError(
            f"config key 'data.seq_len' ({cfg.data.seq_len}) is above the model's limit "
            f"model.max_len ({m.max_len})"
        )
    if cfg.data.seq_len % mesh["sequence"]:
        raise ConfigError(
            f"config key 'data.seq_len' ({cfg.data.seq_len}) does not divide over the "
            f"sequence axis (mesh.sequence x mesh.dcn_sequence = {mesh['sequence']} devices)"
        )
    if m.position == "rope" and (m.head_dim or m.d_model // m.num_heads) % 2:
        raise ConfigError("config key 'model.head_dim' must be even for RoPE")
    _validate_splash(cfg, mesh)
    if m.moe_experts and m.moe_experts % mesh["expert"]:
        raise ConfigError(
            f"config key 'mesh.expert' ({mesh['expert']}) must divide model.moe_experts "
            f"({m.moe_experts}): each device of the expert axis holds moe_experts / expert"
        )
    from jaxformer.parallel.sharding import batch_axes, batch_shards  # imports jax

    shards, data_like = batch_shards(mesh), " x ".join(batch_axes())
    if t.microbatches < 1:
        raise ConfigError(f"config key 'train.microbatches' must be >= 1, got {t.microbatches}")
    for divisor, what in (
        (
            shards * t.microbatches,
            f"{data_like} = {shards} devices times train.microbatches = {t.microbatches}",
        ),
        (process_count, f"{process_count} processes"),
    ):
        if t.global_batch % divisor:
            raise ConfigError(
                f"config key 'train.global_batch' ({t.global_batch}) does not divide over {what}"
            )
    if t.steps < 1:
        raise ConfigError(f"config key 'train.steps' must be >= 1, got {t.steps}")
    if t.loss_chunk:
        if t.loss_chunk < 0 or cfg.data.seq_len % t.loss_chunk:
            raise ConfigError(
                f"config key 'train.loss_chunk' ({t.loss_chunk}) must divide "
                f"data.seq_len ({cfg.data.seq_len})"
            )
        if m.family != "decoder" or mesh.get("stage", 1) > 1:
            raise ConfigError(
                "config key 'train.loss_chunk' works for model.family='decoder' without "
                f"pipelining; got family '{m.family}', mesh.stage {mesh.get('stage', 1)}"
            )
    for key in ("max_bad_steps", "spike_sigma", "spike_warmup"):
        if t[key] < 0:
            raise ConfigError(f"config key 'train.{key}' must be >= 0, got {t[key]}")
    return mesh
