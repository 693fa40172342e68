"""Config schema, overrides, validation and the CLI's config errors."""

import textwrap

import pytest

from jaxformer import cli
from jaxformer.config import (
    MESH_AXES,
    ConfigError,
    apply_overrides,
    base_config,
    load_config,
)
from jaxformer.parallel.mesh import resolve_mesh_shape
from jaxformer.train.validation import validate

# Every mesh axis at size 1: expected shapes below name only the axes they set.
ONES = dict.fromkeys(MESH_AXES, 1)


@pytest.fixture
def default_path(repo_root):
    return str(repo_root / "configs" / "default.py")


def _with(overrides):
    """base_config() with dotted-key overrides, as a config file would set them."""
    cfg = base_config()
    for key, value in overrides.items():
        section, _, leaf = key.rpartition(".")
        cfg[section][leaf] = value
    return cfg


# -- bad inputs: each error names the offending key -------------------------------------


def test_unknown_override_key_names_it_and_suggests(default_path):
    with pytest.raises(ConfigError) as err:
        load_config(default_path, ["--config.optimizer.lrr=1"])
    message = str(err.value)
    assert "'optimizer.lrr'" in message
    assert "did you mean 'optimizer.lr'" in message


def test_unknown_override_section(default_path):
    with pytest.raises(ConfigError, match=r"'modle\.d_model'.*'model\.d_model'"):
        load_config(default_path, ["--config.modle.d_model=64"])


def test_override_without_value(default_path):
    with pytest.raises(ConfigError, match="optimizer.lr"):
        load_config(default_path, ["--config.optimizer.lr"])


def test_unknown_key_in_config_file(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text(
        textwrap.dedent(
            """
            from jaxformer.config import base_config

            def get_config():
                c = base_config()
                c.model.num_layer = 2  # typo for num_layers
                return c
            """
        )
    )
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert "'model.num_layer'" in str(err.value)
    assert "'model.num_layers'" in str(err.value)


def test_config_file_with_argument(tmp_path):
    path = tmp_path / "sized.py"
    path.write_text(
        textwrap.dedent(
            """
            from jaxformer.config import base_config

            def get_config(arg):
                c = base_config()
                c.model.d_model = int(arg)
                return c
            """
        )
    )
    assert load_config(f"{path}:128").model.d_model == 128


def test_config_file_wrong_type_names_key(tmp_path):
    # A file may build its own ConfigDict; missing keys take defaults, types are checked.
    path = tmp_path / "partial.py"
    path.write_text(
        textwrap.dedent(
            """
            import ml_collections

            def get_config():
                return ml_collections.ConfigDict({"model": {"d_model": "wide"}})
            """
        )
    )
    with pytest.raises(ConfigError, match=r"'model\.d_model' must be int, got str"):
        load_config(str(path))


def test_config_file_assigning_wrong_type_is_a_config_error(tmp_path, capsys):
    path = tmp_path / "typed.py"
    path.write_text(
        textwrap.dedent(
            """
            from jaxformer.config import base_config

            def get_config():
                c = base_config()
                c.model.d_model = "wide"
                return c
            """
        )
    )
    assert cli.main(["train", f"--config={path}"]) == 2
    assert "model.d_model" in capsys.readouterr().err


def test_missing_config_file_and_missing_get_config(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.py"))
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    with pytest.raises(ConfigError, match="get_config"):
        load_config(str(empty))


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("--config.train.steps=abc", "train.steps", "int"),
        ("--config.model.d_model=1.5", "model.d_model", "int"),
        ("--config.train.steps=True", "train.steps", "int"),
        ("--config.optimizer.lr=fast", "optimizer.lr", "float"),
        ("--config.model.use_bias=1", "model.use_bias", "bool"),
    ],
)
def test_wrong_type_names_key(default_path, override, key, expected):
    with pytest.raises(ConfigError) as err:
        load_config(default_path, [override])
    assert f"'{key}' must be {expected}" in str(err.value)


def test_invalid_choice_names_key_and_choices(default_path):
    with pytest.raises(ConfigError) as err:
        load_config(default_path, ["--config.model.norm=batchnorm"])
    message = str(err.value)
    assert "'model.norm'" in message and "batchnorm" in message
    assert "rmsnorm" in message and "layernorm" in message


def test_mesh_product_must_match_devices():
    cfg = _with({"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 1})
    with pytest.raises(ConfigError) as err:
        validate(cfg, num_devices=8)
    message = str(err.value)
    for key in ("mesh.data", "mesh.fsdp", "mesh.tensor"):
        assert key in message
    assert "8" in message


def test_mesh_free_axis_that_cannot_fill_devices():
    cfg = _with({"mesh.data": -1, "mesh.fsdp": 3})
    with pytest.raises(ConfigError, match=r"mesh\.data"):
        validate(cfg, num_devices=8)


@pytest.mark.parametrize(
    ("mesh", "message"),
    [
        ({"mesh.data": -1, "mesh.fsdp": -1}, "only one mesh axis"),
        ({"mesh.data": 8, "mesh.tensor": 0}, r"'mesh\.tensor' must be positive"),
    ],
)
def test_bad_mesh_values(mesh, message):
    with pytest.raises(ConfigError, match=message):
        validate(_with(mesh), num_devices=8)


def test_minus_one_mesh_axis_fills_the_rest():
    assert resolve_mesh_shape(_with({}).mesh, 8) == {**ONES, "data": 8}
    cfg = _with({"mesh.data": 2, "mesh.fsdp": -1, "mesh.tensor": 2})
    assert validate(cfg, num_devices=8) == {**ONES, "data": 2, "fsdp": 2, "tensor": 2}
    cfg = _with({"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": -1})
    assert validate(cfg, num_devices=4) == {**ONES, "tensor": 4}


def test_global_batch_must_divide_over_data_and_fsdp():
    cfg = _with({"train.global_batch": 12, "mesh.data": 2, "mesh.fsdp": 4})
    with pytest.raises(ConfigError) as err:
        validate(cfg, num_devices=8)
    assert "'train.global_batch'" in str(err.value)
    # 16 rows do divide over 8 devices.
    assert validate(_with({"train.global_batch": 16, "mesh.fsdp": 8, "mesh.data": 1}), 8)


def test_global_batch_must_divide_over_microbatches():
    cfg = _with({"train.global_batch": 16, "mesh.data": 8, "train.microbatches": 4})
    with pytest.raises(ConfigError) as err:
        validate(cfg, num_devices=8)
    assert "'train.global_batch'" in str(err.value)
    assert "train.microbatches" in str(err.value)
    cfg = _with({"train.global_batch": 32, "mesh.data": 8, "train.microbatches": 4})
    assert validate(cfg, num_devices=8)["data"] == 8


def test_global_batch_must_divide_over_processes():
    cfg = _with({"train.global_batch": 16})
    with pytest.raises(ConfigError, match=r"'train\.global_batch'.*3 processes"):
        validate(cfg, num_devices=1, process_count=3)


def test_microbatches_must_be_positive():
    with pytest.raises(ConfigError, match=r"'train\.microbatches'"):
        validate(_with({"train.microbatches": 0}), num_devices=1)


def test_seq_len_above_max_len_names_both():
    cfg = _with({"data.seq_len": 512, "model.max_len": 256})
    with pytest.raises(ConfigError) as err:
        validate(cfg, num_devices=1)
    assert "data.seq_len" in str(err.value)
    assert "model.max_len" in str(err.value)


def test_num_kv_heads_must_divide_num_heads():
    cfg = _with({"model.num_heads": 4, "model.num_kv_heads": 3})
    with pytest.raises(ConfigError, match=r"'model\.num_kv_heads'"):
        validate(cfg, num_devices=1)
    for kv in (1, 2, 4):
        validate(_with({"model.num_heads": 4, "model.num_kv_heads": kv}), num_devices=1)


def test_num_heads_must_divide_d_model_unless_head_dim_set():
    cfg = _with({"model.d_model": 100, "model.num_heads": 3})
    with pytest.raises(ConfigError, match=r"'model\.num_heads'"):
        validate(cfg, num_devices=1)
    validate(_with({"model.d_model": 100, "model.num_heads": 3, "model.head_dim": 32}), 1)


def test_rope_needs_even_head_dim():
    cfg = _with({"model.head_dim": 7})
    with pytest.raises(ConfigError, match=r"'model\.head_dim'"):
        validate(cfg, num_devices=1)


def test_steps_must_be_positive():
    with pytest.raises(ConfigError, match=r"'train\.steps'"):
        validate(_with({"train.steps": 0}), num_devices=1)


# -- good inputs --------------------------------------------------------------------------


def test_int_override_into_float_field(default_path):
    cfg = load_config(default_path, ["--config.optimizer.lr=1"])
    assert cfg.optimizer.lr == 1.0
    assert isinstance(cfg.optimizer.lr, float)


def test_string_overrides_with_and_without_quotes(default_path):
    cfg = load_config(default_path, ["--config.model.norm=layernorm"])
    assert cfg.model.norm == "layernorm"
    cfg = load_config(default_path, ["--config.model.norm='layernorm'"])
    assert cfg.model.norm == "layernorm"
    cfg = load_config(default_path, ["--config.train.run_dir=/tmp/runs/a-b_c.1"])
    assert cfg.train.run_dir == "/tmp/runs/a-b_c.1"
    cfg = load_config(default_path, ["--config.data.paths=data/*.txt,more/*.txt"])
    assert cfg.data.paths == "data/*.txt,more/*.txt"


def test_numeric_looking_string_override(default_path):
    cfg = load_config(default_path, ["--config.train.run_dir=2024"])
    assert cfg.train.run_dir == "2024"


def test_override_forms_and_values(default_path):
    cfg = load_config(
        default_path,
        [
            "--config.model.d_model=128",
            "config.train.tensorboard=False",
            "optimizer.lr=3e-4",
            "--config.mesh.data=-1",
        ],
    )
    assert cfg.model.d_model == 128
    assert cfg.train.tensorboard is False
    assert cfg.optimizer.lr == pytest.approx(3e-4)
    assert cfg.mesh.data == -1


def test_apply_overrides_in_place():
    cfg = base_config()
    apply_overrides(cfg, ["--config.train.steps=7", "--config.model.position=learned"])
    assert cfg.train.steps == 7 and cfg.model.position == "learned"


def test_loaded_config_is_locked(default_path):
    cfg = load_config(default_path)
    with pytest.raises(AttributeError):
        cfg.model.new_key = 1


@pytest.mark.parametrize("name", ["default.py", "decoder_100m.py"])
def test_shipped_configs_load_and_validate(repo_root, name):
    cfg = load_config(str(repo_root / "configs" / name))
    assert set(cfg.keys()) == set(base_config().keys())
    mesh = validate(cfg, num_devices=1)
    assert mesh == ONES
    if name == "decoder_100m.py":
        assert cfg.model.d_model == 768 and cfg.model.num_layers == 14
        assert cfg.data.seq_len == 512


def test_cli_unknown_key_exits_2_with_message(default_path, capsys):
    code = cli.main(["train", f"--config={default_path}", "--config.optimizer.lrr=1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "jaxformer: config error:" in err
    assert "'optimizer.lrr'" in err and "'optimizer.lr'" in err


def test_cli_bad_type_and_stray_argument_exit_2(default_path, capsys):
    assert cli.main(["eval", f"--config={default_path}", "--config.train.steps=abc"]) == 2
    assert "'train.steps'" in capsys.readouterr().err
    assert cli.main(["train", f"--config={default_path}", "--stepz=3"]) == 2
    assert "--stepz=3" in capsys.readouterr().err
