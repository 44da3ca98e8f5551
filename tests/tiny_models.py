"""A random-weight Llama and pseudo-English text, built in seconds on a CPU: the model and data
of the calibrator, harness and harness-benchmark tests."""

import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ("the of and to in is that it for was on are as with his they at be this from have or by "
         "one had not but what all were when we there can an your which their said if do will each "
         "about how up out them then she many some so these would other into has more her two like "
         "him see time could no make than first been its who now people my made over did down only "
         "way find use may water long little very after words called just where most know").split()


def tiny_checkpoint(directory, num_layers: int = 2, seed: int = 0):
    """Save a random-weight Llama (hidden 64, 4 heads, 2 KV heads, head_dim 64) and a byte-level
    tokenizer (one token per byte, EOS) to `directory`; returns the directory as str."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {"<eos>": len(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=4096, initializer_range=0.2,
                         tie_word_embeddings=False, eos_token_id=len(alphabet))
    LlamaForCausalLM(config).save_pretrained(directory)
    return str(directory)


def text_file(path, words: int = 6000, seed: int = 0):
    """Pseudo-English sentences (byte-level: about 5 tokens per word)."""
    rng = random.Random(seed)
    sentences = []
    while sum(len(s.split()) for s in sentences) < words:
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))).capitalize() + ".")
    path.write_text(" ".join(sentences))
    return str(path)
