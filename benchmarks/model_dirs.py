"""The model folder the serving and latency benchmarks serve when no --model-path is given: a
dummy-weight Qwen3-8B folder (config.json and the Qwen tokenizer, no weights) prepared once from
the shared models folder, which is found in its usual places unless named.
"""

import lzma
import shutil
from pathlib import Path

from benchmarks.paths import REPO_ROOT

DEFAULT_MODEL = "qwen3-8b"
TOKENIZER_DIR = "qwen-tokenizer"


def find_shared_models(explicit=None):
    """The folder with the dummy-model configs and the tokenizer (see shared/models/README.md)."""
    candidates = (
        [Path(explicit)]
        if explicit
        else [
            REPO_ROOT / "shared" / "models",
            REPO_ROOT.parent / "shared" / "models",
            REPO_ROOT / ".gpu" / "models",
        ]
    )
    for folder in candidates:
        if (folder / DEFAULT_MODEL / "config.json").is_file() and (folder / TOKENIZER_DIR).is_dir():
            return folder
    raise FileNotFoundError(
        "no shared models folder with qwen3-8b/config.json and qwen-tokenizer/ in "
        + ", ".join(map(str, candidates))
        + "; pass --shared-models or --model-path"
    )


def prepare_model_dir(shared_models, work_dir, model=DEFAULT_MODEL):
    """Create (once) a servable dummy-weight folder: config.json plus the Qwen tokenizer files.

    tokenizer.json is taken as is or decompressed from tokenizer.json.xz.
    """
    shared_models = Path(shared_models)
    target = Path(work_dir) / f"{model}-dummy"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shared_models / model / "config.json", target / "config.json")
    tokenizer = shared_models / TOKENIZER_DIR
    shutil.copyfile(tokenizer / "tokenizer_config.json", target / "tokenizer_config.json")
    if not (target / "tokenizer.json").is_file():
        partial = target / "tokenizer.json.partial"
        if (tokenizer / "tokenizer.json").is_file():
            shutil.copyfile(tokenizer / "tokenizer.json", partial)
        else:
            with lzma.open(tokenizer / "tokenizer.json.xz") as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
        partial.rename(target / "tokenizer.json")
    return target


def resolve_model_path(args):
    """--model-path if given, else the prepared dummy Qwen3-8B folder."""
    if args.model_path is not None:
        return args.model_path.resolve()
    return prepare_model_dir(find_shared_models(args.shared_models), args.work_dir).resolve()
