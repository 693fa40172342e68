"""BERT beyond masked LM: next-sentence-prediction pairs, ``train.init_from`` and a
sequence-classification fine-tune on the built-in ``stdlib_packages`` task."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from flax import nnx

from jaxformer import data as jdata
from jaxformer.config import ConfigError, base_config, load_config
from jaxformer.data.bert_tasks import IS_NEXT, NOT_NEXT, PACKAGES, bert_row, line_spans
from jaxformer.data.tokenizers import ByteTokenizer
from jaxformer.train.logs import read_metrics
from jaxformer.train.validation import validate

TINY = [
    "--config.model.d_model=64", "--config.model.num_layers=1", "--config.model.num_heads=4",
    "--config.model.d_ff=128", "--config.model.max_len=64", "--config.model.dropout=0.0",
    "--config.data.seq_len=64", "--config.train.global_batch=16", "--config.train.log_every=10",
    "--config.train.tensorboard=False", "--config.train.async_checkpoints=False",
    "--config.optimizer.warmup_steps=5", "--config.optimizer.lr=3e-3",
    "--config.optimizer.schedule=constant", "--config.mesh.data=-1",
]  # fmt: skip
TOK = ByteTokenizer()
CLS, SEP, PAD = TOK.bos_id, TOK.eos_id, TOK.pad_id


def _config(repo_root: Path, name: str, run_dir: Path, *extra: str) -> Any:
    return load_config(
        str(repo_root / "configs" / name), [*TINY, f"--config.train.run_dir={run_dir}", *extra]
    )


def test_bert_row_layout() -> None:
    a, b = np.arange(10, 15), np.arange(20, 23)
    row = bert_row(a, b, 12, cls_id=CLS, sep_id=SEP)
    np.testing.assert_array_equal(row["inputs"], [CLS, 10, 11, 12, 13, 14, SEP, 20, 21, 22, SEP, 0])
    np.testing.assert_array_equal(row["token_type_ids"], [0] * 7 + [1] * 4 + [0])
    np.testing.assert_array_equal(row["segment_ids"], [1] * 11 + [0])
    np.testing.assert_array_equal(row["positions"], list(range(11)) + [0])
    # Too long: the longer text loses tokens from its end first.
    row = bert_row(np.arange(10, 20), b, 10, cls_id=CLS, sep_id=SEP)
    np.testing.assert_array_equal(row["inputs"], [CLS, 10, 11, 12, 13, SEP, 20, 21, 22, SEP])
    single = bert_row(a, None, 8, cls_id=CLS, sep_id=SEP)
    np.testing.assert_array_equal(single["inputs"], [CLS, 10, 11, 12, 13, 14, SEP, 0])
    assert not single["token_type_ids"].any()


def test_line_spans_cover_the_text() -> None:
    text = "def f():\n    return 1\n\n" + "x" * 30 + "\nlast"
    spans = line_spans(text, TOK, 12)
    assert all(1 <= len(s) <= 12 for s in spans)
    assert TOK.decode(np.concatenate(spans)) == text
    assert TOK.decode(spans[0]) == "def f():\n"  # whole lines while they fit


@pytest.fixture(scope="module")
def corpus() -> str:
    """Every stdlib document, joined: IsNext pairs must be consecutive text in it."""
    docs = jdata.load_documents(base_config().data, "train")
    return "\x00".join(docs[i] for i in range(len(docs)))


def _nsp_batches(seed: int, count: int) -> list[dict[str, np.ndarray]]:
    ds = jdata.make_nsp_dataset(
        base_config().data, split="train", seq_len=64, global_batch=64,
        process_index=0, process_count=1, seed=seed, repeat=True, mask_id=TOK.vocab_size,
    )  # fmt: skip
    return list(itertools.islice(iter(ds), count))


def test_nsp_pairs(corpus: str) -> None:
    batches = _nsp_batches(seed=3, count=16)
    labels = np.concatenate([b["nsp_targets"][:, 0] for b in batches])
    assert set(np.unique(labels)) == {IS_NEXT, NOT_NEXT}
    # 1024 fair coins: 0.5 +- 0.05 is 3.2 standard deviations.
    assert abs(np.mean(labels == IS_NEXT) - 0.5) < 0.05
    first = batches[0]
    follows_by_label: dict[int, list[bool]] = {IS_NEXT: [], NOT_NEXT: []}
    for i in range(len(first["targets"])):
        tokens = first["targets"][i]  # the unmasked row
        real = first["segment_ids"][i] > 0
        n = int(real.sum())
        assert (first["segment_ids"][i][:n] == 1).all() and not real[n:].any()
        assert tokens[0] == CLS and (tokens[n:] == PAD).all()
        seps = np.flatnonzero(tokens[:n] == SEP)
        assert len(seps) == 2 and seps[1] == n - 1 and 1 < seps[0] < n - 2
        types = first["token_type_ids"][i]
        assert (types[: seps[0] + 1] == 0).all() and (types[seps[0] + 1 : n] == 1).all()
        assert not types[n:].any()
        # Masked LM on top: never a [CLS], [SEP] or padding position.
        masked = first["weights"][i] > 0
        assert masked.any() and not np.isin(tokens[masked], [CLS, SEP, PAD]).any()
        # Decoded together: a span boundary may split a UTF-8 character.
        a_then_b = TOK.decode(np.concatenate([tokens[1 : seps[0]], tokens[seps[0] + 1 : n - 1]]))
        follows_by_label[int(first["nsp_targets"][i, 0])].append(a_then_b in corpus)
    assert all(follows_by_label[IS_NEXT])  # B is the text right after A
    # A random span after A is (almost) never text of the corpus; blank lines can be.
    assert np.mean(follows_by_label[NOT_NEXT]) < 0.1
    # Deterministic given the seed; another seed draws other pairs.
    again = _nsp_batches(seed=3, count=2)
    for key in first:
        np.testing.assert_array_equal(again[0][key], first[key])
    other = _nsp_batches(seed=4, count=1)[0]
    assert not np.array_equal(other["inputs"], first["inputs"])


@pytest.fixture(scope="module")
def pretrained(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny BERT pre-trained with MLM + NSP through ``jaxformer train``."""
    from jaxformer.train.loop import train

    run_dir = tmp_path_factory.mktemp("bert_nsp")
    cfg = _config(
        repo_root, "bert.py:tiny", run_dir, "--config.data.nsp=True",
        # The stdlib corpus as the other tests build it (bert.py:tiny holds out 20%).
        "--config.data.eval_fraction=0.02",
        "--config.train.steps=60", "--config.train.eval_every=60",
        "--config.train.eval_batches=4", "--config.train.checkpoint_every=60",
    )  # fmt: skip
    train(cfg)
    return {"run_dir": run_dir, "cfg": cfg}


def test_nsp_pretraining_trains(pretrained: dict[str, Any], tmp_path: Path) -> None:
    from jaxformer.train.loop import _global_batch, setup

    evals = read_metrics(pretrained["run_dir"], "eval")
    train_logs = read_metrics(pretrained["run_dir"], "train")
    assert {"nsp_loss", "nsp_accuracy"} <= set(evals[-1]) and "nsp_accuracy" in train_logs[-1]
    assert evals[-1]["loss"] < evals[0]["loss"] - 1.0  # masked LM
    assert train_logs[-1]["loss"] > train_logs[-1]["nll"] + 0.5  # loss = MLM + NSP (~ln 2)
    # NSP gets gradients: a fresh model fits the labels of one batch.
    cfg = pretrained["cfg"].copy_and_resolve_references()
    cfg.train.run_dir = str(tmp_path)
    run = setup(cfg)
    batch = _global_batch(next(iter(run.train_data)), run.mesh)
    state, losses = run.state, []
    for _ in range(40):
        state, metrics = run.train_step(state, batch)
        losses.append(float(metrics["nsp_loss"]))
    run.checkpointer.close()
    assert abs(losses[0] - np.log(2)) < 0.05 and losses[-1] < 0.55, losses


def _params(state: Any) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state.params))[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def test_init_from_then_classify(repo_root: Path, pretrained: dict[str, Any], tmp_path: Path):
    from jaxformer.train.loop import setup, train

    source = setup(pretrained["cfg"])  # restores the pre-training run's latest checkpoint
    saved = _params(source.state)
    source.checkpointer.close()
    cfg = _config(
        repo_root, "bert_classify.py", tmp_path,
        f"--config.train.init_from={pretrained['run_dir']}",
        "--config.train.steps=80", "--config.train.eval_every=80", "--config.train.eval_batches=20",
        "--config.train.global_batch=64", "--config.optimizer.warmup_steps=10",
    )  # fmt: skip
    run = setup(cfg)
    loaded = _params(run.state)
    run.checkpointer.close()
    classifier = [k for k in loaded if k.startswith("['classifier']")]
    assert classifier and not any(k in saved for k in classifier)
    for key, value in saved.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    # The classifier is a fresh initialisation: the same values as without init_from.
    fresh_cfg = _config(repo_root, "bert_classify.py", tmp_path / "fresh")
    fresh = setup(fresh_cfg)
    fresh_params = _params(fresh.state)
    fresh.checkpointer.close()
    for key in classifier:
        np.testing.assert_array_equal(loaded[key], fresh_params[key], err_msg=key)
    assert not np.array_equal(loaded["['encoder']['attn']['q']['kernel']"],
                              fresh_params["['encoder']['attn']['q']['kernel']"])  # fmt: skip

    last = train(cfg)
    logs = read_metrics(tmp_path, "train")
    assert np.mean([r["loss"] for r in logs[-3:]]) < logs[0]["loss"] - 0.05
    evals = read_metrics(tmp_path, "eval")
    assert evals[-1]["loss"] < evals[0]["loss"]
    # 1280 held-out spans, 4 balanced classes: chance is 0.25 +- 0.012.
    assert last["eval"]["tokens"] == 1280 and last["eval"]["accuracy"] > 0.275
    assert "bits_per_byte" not in last["eval"]


def test_init_from_errors(repo_root: Path, pretrained: dict[str, Any], tmp_path: Path) -> None:
    from jaxformer.train.loop import setup

    empty = tmp_path / "empty_run"
    empty.mkdir()
    for path in (tmp_path / "missing", empty):
        cfg = _config(
            repo_root, "bert_classify.py", tmp_path / "a", f"--config.train.init_from={path}"
        )
        with pytest.raises(ConfigError, match=r"train\.init_from.*no checkpoint"):
            setup(cfg)
    wider = _config(
        repo_root, "bert_classify.py", tmp_path / "b", "--config.model.d_model=128",
        f"--config.train.init_from={pretrained['run_dir']}",
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"train\.init_from.*embed \(384, 64\).*\(384, 128\)"):
        setup(wider)


def test_classification_config_errors(repo_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.num_labels"):  # labels without a classifier
        validate(_config(repo_root, "bert_classify.py", tmp_path, "--config.model.num_labels=0"), 8)
    with pytest.raises(jdata.DataError, match=f"model.num_labels={len(PACKAGES)}"):
        jdata.load_examples(
            _config(repo_root, "bert_classify.py", tmp_path).data, "eval", num_labels=3,
            max_chars=62,
        )  # fmt: skip
    cfg = _config(
        repo_root, "bert_classify.py", tmp_path, "--config.data.name=tfds",
        "--config.data.tfds_name=glue/sst2", "--config.data.label_key=label",
        f"--config.data.data_dir={tmp_path}", "--config.model.num_labels=2",
    )  # fmt: skip
    with pytest.raises(jdata.MissingDataError, match="glue/sst2"):
        jdata.load_examples(cfg.data, "train", num_labels=2, max_chars=62)
