"""SGLang plugin entry point (`sglang.srt.plugins` → `oscar = oscar_sglang.plugin:register`).

SGLang calls `register()` in the launcher before it parses the command line and first thing in
every scheduler process. It installs the hooks of oscar_sglang.patches:

- flags `--kv-quant {none,oscar}` and `--oscar-*`, and the startup checks
  (oscar_sglang.validation) around ServerArgs.__post_init__ (patches/server_args.py);
- the "oscar" attention backend (patches/attention_registry.py) and the hooks that size and
  build the OSCAR KV pool (patches/pool_configurator.py, patches/kv_cache_configurator.py);
- for --enable-deterministic-inference: "oscar" among SGLang's deterministic backends, aligned
  prefill chunks (patches/scheduler.py);
- the token allocators' release points, which free the sink-pool rows of slots going back to the
  free list (patches/allocator_token.py, patches/allocator_paged.py).

Command line:

    python -m sglang.launch_server --model-path M --kv-quant oscar --oscar-rotations R

Engine API (settings are the environment variables; attention_backend="oscar" turns it on):

    os.environ["SGLANG_OSCAR_ROTATIONS"] = "R"
    sglang.Engine(model_path="M", attention_backend="oscar")

A hook that fails to apply (SGLang logs and swallows such failures) makes an OSCAR server refuse
to start instead of serving a BF16 cache. Kernels, pool and backend are imported only when used.
"""


def register() -> None:
    from oscar_sglang import patches

    patches.register()
