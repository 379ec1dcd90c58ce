"""Calibration text: hub datasets by name, or local files that need no network.

``load_calib_texts`` accepts one of the names in ``HUB_DATASETS`` (fetched with
``datasets.load_dataset``) or a local path: a ``.txt`` (one sample a line),
``.jsonl`` / ``.json`` (a ``"text"`` field), ``.parquet`` (a ``text``
column), any of them gzipped (``.gz``), or a folder of such files.

``calib_windows`` turns texts into ``n_samples`` token windows of ``seqlen``.
"""

import gzip
import importlib.util
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from tpserve.engine.errors import ConfigError


@dataclass(frozen=True)
class HubDataset:
    path: str
    name: str | None
    field: str
    data_files: dict | None = None
    only_split: str | None = None  # datasets that ship a single split
    needs: str | None = None  # a Python package its files need


HUB_DATASETS = {
    "c4": HubDataset(
        "allenai/c4", None, "text",
        data_files={
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
    ),
    "wikitext2": HubDataset("wikitext", "wikitext-2-raw-v1", "text"),
    "ptb": HubDataset("ptb_text_only", "penn_treebank", "sentence"),
    "pileval": HubDataset("mit-han-lab/pile-val-backup", None, "text", only_split="validation",
                          needs="zstandard"),  # its file is .jsonl.zst
}

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
TEXT_FIELD = "text"


def load_calib_texts(name_or_path: str, split: str = "train") -> list[str]:
    """Non-empty text samples of a named hub dataset or of a local file/folder."""
    if os.path.exists(name_or_path):
        texts = _read_local(Path(name_or_path))
    elif name_or_path in HUB_DATASETS:
        texts = _load_hub(name_or_path, split)
    else:
        raise ConfigError(
            f"calibration dataset {name_or_path!r} is neither a local file/folder nor one of "
            f"{', '.join(HUB_DATASETS)}; pass a path to a .txt/.jsonl/.json/.parquet file "
            "(or a folder of them) with --calib-dataset PATH"
        )
    texts = [t for t in texts if t and not t.isspace()]
    if not texts:
        raise ConfigError(f"calibration dataset {name_or_path!r} holds no text")
    return texts


# ---------------------------------------------------------------- local files

def _suffix(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return suffixes[-1].lower() if suffixes else ""


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in LOCAL_SUFFIXES)
    if not files:
        raise ConfigError(
            f"folder {path} holds no calibration files ({', '.join(LOCAL_SUFFIXES)}, optionally .gz)"
        )
    return files


def _read_local(path: Path) -> list[str]:
    texts: list[str] = []
    for file in _local_files(path):
        texts.extend(_read_file(file))
    return texts


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_file(path: Path) -> list[str]:
    kind = _suffix(path)
    if kind == ".txt":
        with _open_text(path) as f:
            return f.read().splitlines()
    if kind == ".jsonl":
        return _read_json_lines(path)
    if kind == ".json":
        return _read_json(path)
    if kind == ".parquet":
        return _read_parquet(path)
    raise ConfigError(
        f"unsupported calibration file {path}; use one of {', '.join(LOCAL_SUFFIXES)}"
    )


def _text_of(record, path: Path) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict) and isinstance(record.get(TEXT_FIELD), str):
        return record[TEXT_FIELD]
    keys = list(record) if isinstance(record, dict) else type(record).__name__
    raise ConfigError(f"{path}: each record needs a string {TEXT_FIELD!r} field (found {keys})")


def _read_json_lines(path: Path) -> list[str]:
    with _open_text(path) as f:
        try:
            return [_text_of(json.loads(line), path) for line in f if line.strip()]
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON lines: {e}") from None


def _read_json(path: Path) -> list[str]:
    with _open_text(path) as f:
        raw = f.read()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return _read_json_lines(path)  # JSON lines saved as .json, as datasets accepts
    if isinstance(data, dict) and isinstance(data.get(TEXT_FIELD), list):
        data = data[TEXT_FIELD]
    if not isinstance(data, list):
        data = [data]
    return [_text_of(r, path) for r in data]


def _read_parquet(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if TEXT_FIELD not in table.column_names:
        raise ConfigError(
            f"{path}: needs a {TEXT_FIELD!r} column (found {table.column_names})"
        )
    return [t for t in table.column(TEXT_FIELD).to_pylist() if isinstance(t, str)]


# ---------------------------------------------------------------- hub datasets

def _offline_fix(name: str) -> str:
    return (
        f"pass a local file with --calib-dataset PATH (.txt, .jsonl, .json or .parquet), or "
        f"set HF_DATASETS_OFFLINE=1 with a cached copy of {name!r}"
    )


def _hub_offline() -> bool:
    flags = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    return any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _hub_reachable(timeout_s: float = 5.0) -> bool:
    """One short request to the hub endpoint (proxies honoured); datasets' own retries take minutes."""
    import httpx
    from huggingface_hub import constants

    try:
        httpx.head(constants.ENDPOINT, timeout=timeout_s, follow_redirects=True)
    except httpx.HTTPError:
        return False
    return True


def _load_hub(name: str, split: str) -> list[str]:
    spec = HUB_DATASETS[name]
    if spec.needs and importlib.util.find_spec(spec.needs) is None:
        raise ConfigError(f"loading {name!r} needs the {spec.needs} package: pip install {spec.needs}")
    if not _hub_offline() and not _hub_reachable():
        raise ConfigError(f"cannot reach the Hugging Face hub to fetch {name!r}; {_offline_fix(name)}")
    split = spec.only_split or split
    from datasets import load_dataset

    kwargs = {"split": split}
    if spec.data_files is not None:
        if split not in spec.data_files:
            raise ConfigError(f"{name!r} has no split {split!r}; use one of {list(spec.data_files)}")
        kwargs["data_files"] = {split: spec.data_files[split]}
    try:
        rows = load_dataset(spec.path, spec.name, **kwargs)
    except Exception as e:  # datasets raises many types for missing caches and network errors
        raise ConfigError(f"could not load {name!r} ({type(e).__name__}: {e}); {_offline_fix(name)}") from e
    return list(rows[spec.field])


# ---------------------------------------------------------------- token windows

def _tokenize_until(texts: list[str], tokenizer, needed: int, rng: random.Random) -> Tensor:
    """Token ids of the texts in a seeded random order, joined by blank lines, stopping past ``needed``."""
    order = list(range(len(texts)))
    rng.shuffle(order)
    chunks, total, batch = [], 0, 64
    for start in range(0, len(order), batch):
        joined = "\n\n".join(texts[i] for i in order[start:start + batch]) + "\n\n"
        ids = tokenizer(joined, add_special_tokens=False)["input_ids"]
        chunks.append(torch.tensor(ids, dtype=torch.long))
        total += len(ids)
        if total >= needed:
            break
    return torch.cat(chunks)


def calib_windows(texts: list[str], tokenizer, n_samples: int, seqlen: int, seed: int = 0) -> Tensor:
    """``[n_samples, seqlen]`` token windows drawn at seeded random offsets of the tokenized texts.

    Only as much text is tokenized as ``n_samples * seqlen`` tokens need (documents
    in a seeded random order), so a large corpus costs no more than a small one.
    """
    if n_samples < 1 or seqlen < 2:
        raise ConfigError(f"need calib_samples >= 1 and calib_seqlen >= 2, got {n_samples}, {seqlen}")
    rng = random.Random(seed)
    ids = _tokenize_until(texts, tokenizer, n_samples * seqlen, rng)
    if ids.numel() < seqlen:
        raise ConfigError(
            f"the calibration text has only {ids.numel()} tokens, fewer than calib_seqlen={seqlen}; "
            "use a larger dataset or a smaller --calib-seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n_samples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
