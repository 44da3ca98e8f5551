"""OSCAR 2-bit rotated KV cache for stock SGLang 0.5.17 (see README.md)."""

__version__ = "0.1.0"
