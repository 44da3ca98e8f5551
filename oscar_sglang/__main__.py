"""`python -m oscar_sglang calibrate|evaluate ...` (see oscar_sglang/cli.py)."""

from oscar_sglang.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
