"""A TFDS builder that turns local text files into array_record train/eval splits.

Why TFDS: it gives us a versioned on-disk layout, atomic preparation (it writes to an
``incomplete.*`` dir and renames) and ``as_data_source`` random access over
array_record, which grain shuffles and checkpoints cheaply. Nothing here imports
TensorFlow.

The built-in corpus is the Python standard library of the running interpreter, so
jaxformer can train out of the box on any machine without a download.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from jaxformer.errors import DataError, MissingDataError

DEFAULT_DATA_DIR = "~/.cache/jaxformer/tfds"
DATA_DIR_ENV = "JAXFORMER_DATA_DIR"
_GLOB_CHARS = "*?["


def default_data_dir() -> str:
    """``$JAXFORMER_DATA_DIR`` if set, else ``~/.cache/jaxformer/tfds``."""
    return os.path.expanduser(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One input file; ``key`` is its path relative to the glob root.

    The key (not the absolute path) decides the split, so the same corpus gets the
    same eval split on every machine, wherever it is checked out.
    """

    path: str
    key: str
    size: int
    mtime_ns: int


def _source_file(path: str, root: str) -> SourceFile:
    st = os.stat(path)
    key = Path(os.path.relpath(path, root)).as_posix()
    return SourceFile(path=path, key=key, size=st.st_size, mtime_ns=st.st_mtime_ns)


def stdlib_files() -> list[SourceFile]:
    """All ``*.py`` of this interpreter's stdlib (no site-packages/__pycache__), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for path in Path(root).rglob("*.py"):
        rel = path.relative_to(root).parts
        if "site-packages" in rel or "dist-packages" in rel or "__pycache__" in rel:
            continue
        if path.is_file():
            found.append(_source_file(str(path), root))
    return sorted(found, key=lambda f: f.key)


def _glob_root(pattern: str) -> str:
    """The leading wildcard-free directory of ``pattern`` (keys are relative to it)."""
    parts = Path(pattern).parts
    static = []
    for part in parts[:-1]:
        if any(c in part for c in _GLOB_CHARS):
            break
        static.append(part)
    return str(Path(*static)) if static else "."


def glob_files(patterns: str) -> list[SourceFile]:
    """Expands comma-separated globs (``**`` allowed) into sorted, de-duplicated files."""
    found: dict[str, SourceFile] = {}
    for raw in patterns.split(","):
        pattern = os.path.expanduser(raw.strip())
        if not pattern:
            continue
        matches = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        if not matches:
            raise MissingDataError(f"data.paths pattern {pattern!r} matched no files.")
        root = _glob_root(pattern)
        for path in matches:
            real = os.path.realpath(path)
            if real not in found:
                found[real] = _source_file(path, root)
    if not found:
        raise DataError(f"data.paths={patterns!r} names no files.")
    return sorted(found.values(), key=lambda f: (f.key, f.path))


def _unit_hash(key: str) -> float:
    """A stable uniform number in [0, 1) from a document key."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


@dataclasses.dataclass(eq=False, repr=False)
class TextFilesConfig(tfds.core.BuilderConfig):
    """The file list and split settings; the config name is a hash of them."""

    files: tuple[SourceFile, ...] = ()
    eval_fraction: float = 0.02
    text_key: str = "text"

    def __repr__(self) -> str:  # TFDS logs the config; don't print thousands of paths
        return f"TextFilesConfig(name={self.name!r}, description={self.description!r})"


def make_config(
    files: Sequence[SourceFile], *, eval_fraction: float, text_key: str = "text", label: str
) -> TextFilesConfig:
    """Names the config by a hash of (files, sizes, mtimes, fraction, text_key).

    A changed corpus therefore lands in a new directory and is rebuilt rather than
    silently reusing stale data.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"data.eval_fraction must be in [0, 1), got {eval_fraction}.")
    h = hashlib.sha256()
    h.update(f"{TextFiles.VERSION}|{eval_fraction!r}|{text_key}\n".encode())
    for f in files:
        h.update(f"{f.key}\0{f.path}\0{f.size}\0{f.mtime_ns}\n".encode())
    return TextFilesConfig(
        name=f"{label}_{h.hexdigest()[:16]}",
        description=f"{label}: {len(files)} files, eval_fraction={eval_fraction}",
        files=tuple(files),
        eval_fraction=eval_fraction,
        text_key=text_key,
    )


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def _jsonl_records(path: str, text_key: str) -> Iterator[tuple[int, str]]:
    """(line number, text) for each non-empty record of a ``.jsonl`` file."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_key]
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object with a string field "
                    f"{text_key!r} (data.text_key)"
                ) from e
            if isinstance(text, str) and text.strip():
                yield lineno, text


class TextFiles(tfds.core.GeneratorBasedBuilder):
    """Local text files as documents: one per file, or one per line of ``.jsonl``.

    A document goes to ``eval`` when the hash of its key (relative path, plus line
    number for jsonl) is below ``eval_fraction``, so adding files never moves existing
    documents between splits. Empty/whitespace-only documents are skipped.
    """

    name = "jaxformer_text_files"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS: list[TextFilesConfig] = []  # configs are made per corpus
    # TFDS derives code_path via importlib_resources, which it does not install on
    # Python >= 3.9; pin it to this file (there are no checksums or metadata to find).
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local text files prepared by jaxformer.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        )

    def _documents(self) -> list[tuple[str, SourceFile, int]]:
        """(example key, file, jsonl line or 0) for every document, in file order."""
        cfg: TextFilesConfig = self.builder_config
        docs = []
        for f in cfg.files:
            if f.path.endswith(".jsonl"):
                for lineno, _ in _jsonl_records(f.path, cfg.text_key):
                    docs.append((f"{f.key}:{lineno}", f, lineno))
            else:
                docs.append((f.key, f, 0))
        return docs

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        del dl_manager  # everything is local
        cfg: TextFilesConfig = self.builder_config
        docs = self._documents()
        if not docs:
            raise DataError("The corpus has no documents.")
        if cfg.eval_fraction == 0.0:
            return {"train": self._generate_examples(docs)}
        if len(docs) < 2:
            raise DataError("A train/eval split needs at least 2 documents.")
        hashes = [_unit_hash(key) for key, _, _ in docs]
        is_eval = [h < cfg.eval_fraction for h in hashes]
        # Tiny corpora: TFDS cannot write an empty split, so move the extreme document.
        if not any(is_eval):
            is_eval[min(range(len(docs)), key=hashes.__getitem__)] = True
        if all(is_eval):
            is_eval[max(range(len(docs)), key=hashes.__getitem__)] = False
        train = [d for d, e in zip(docs, is_eval, strict=True) if not e]
        evals = [d for d, e in zip(docs, is_eval, strict=True) if e]
        return {"train": self._generate_examples(train), "eval": self._generate_examples(evals)}

    def _generate_examples(
        self, docs: list[tuple[str, SourceFile, int]]
    ) -> Iterator[tuple[str, dict[str, str]]]:
        cfg: TextFilesConfig = self.builder_config
        jsonl_cache: tuple[str, dict[int, str]] | None = None
        for key, f, lineno in docs:
            if lineno:
                if jsonl_cache is None or jsonl_cache[0] != f.path:
                    jsonl_cache = (f.path, dict(_jsonl_records(f.path, cfg.text_key)))
                text = jsonl_cache[1][lineno]
            else:
                text = _read_text(f.path)
                if not text.strip():
                    continue
            yield key, {"text": text}


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """An exclusive advisory lock so concurrent processes build a corpus only once."""
    import fcntl  # POSIX only; imported here so the module still imports elsewhere.

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(config: TextFilesConfig, data_dir: str | None = None) -> TextFiles:
    """Returns a prepared builder, building the array_record files on first use.

    Holds a per-config file lock while checking and building, so a second process
    waits and then reuses the first one's result (TFDS itself renames an
    ``incomplete.*`` dir into place, so readers never see a partial build).
    """
    data_dir = os.path.expanduser(data_dir or default_data_dir())
    lock = os.path.join(data_dir, TextFiles.name, f".{config.name}.lock")
    with _file_lock(lock):
        builder = TextFiles(config=config, data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
            builder.download_and_prepare()
            # Re-open so the builder reads the info it just wrote (split sizes, ...).
            builder = TextFiles(config=config, data_dir=data_dir, file_format="array_record")
    return builder
