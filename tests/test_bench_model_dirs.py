"""CPU tests of benchmarks/model_dirs.py: the dummy-weight model folder is prepared once from the
shared models folder, with the tokenizer decompressed.
"""

import lzma

import pytest

from benchmarks import model_dirs


def test_prepare_model_dir_decompresses_the_tokenizer(tmp_path):
    shared = tmp_path / "models"
    (shared / "qwen3-8b").mkdir(parents=True)
    (shared / "qwen3-8b" / "config.json").write_text('{"model_type": "qwen3"}')
    (shared / "qwen-tokenizer").mkdir()
    (shared / "qwen-tokenizer" / "tokenizer_config.json").write_text("{}")
    (shared / "qwen-tokenizer" / "tokenizer.json.xz").write_bytes(lzma.compress(b'{"model": {}}'))
    assert model_dirs.find_shared_models(shared) == shared
    folder = model_dirs.prepare_model_dir(shared, tmp_path / "work")
    assert folder == tmp_path / "work" / "qwen3-8b-dummy"
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert (folder / "tokenizer.json").read_text() == '{"model": {}}'
    assert model_dirs.prepare_model_dir(shared, tmp_path / "work") == folder  # idempotent
    with pytest.raises(FileNotFoundError):
        model_dirs.find_shared_models(tmp_path / "nothing")
