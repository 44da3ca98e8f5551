"""Shared by the GPU tests that start a real SGLang server (test_server_gpu.py,
test_soak_gpu.py): the dummy-weight Qwen3-8B folder with a chat template, the launch command
(every child in its own process group, NVLink multicast off: benchmarks.processes), waiting for the
server, and small JSON-over-HTTP calls. Importable without CUDA; starts nothing on import.
"""

import contextlib
import json
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from benchmarks import model_dirs, processes

LOG_DIR = Path("/tmp/oscar-gpu-tests")
STARTUP_TIMEOUT = 600.0

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def url(port, path):
    return f"http://127.0.0.1:{port}{path}"


def post(port, path, body, timeout=300):
    """POST `body` as JSON; the decoded JSON answer (urllib raises HTTPError on 4xx/5xx)."""
    request = urllib.request.Request(url(port, path), data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def get_json(port, path, timeout=30):
    with urllib.request.urlopen(url(port, path), timeout=timeout) as response:
        return json.loads(response.read())


def request_status(port, path, method="GET", timeout=60):
    """(HTTP status, body text) of a body-less request; 4xx/5xx are returned, not raised."""
    request = urllib.request.Request(url(port, path), method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def model_dir():
    """The dummy-weight Qwen3-8B folder (config + tokenizer) with a ChatML template written in
    (the shared tokenizer has none)."""
    model = model_dirs.prepare_model_dir(model_dirs.find_shared_models(), LOG_DIR / "models")
    (model / "chat_template.jinja").write_text(CHATML)
    return model


def server_command(model, port, flags, env=()):
    return ["env", *env, sys.executable, "-m", "sglang.launch_server", "--model-path", str(model),
            "--port", str(port), "--chat-template", str(model / "chat_template.jinja"), *flags]


def start_server(name, flags, env=()):
    """(port, log path, context manager of the process) for `python -m sglang.launch_server`
    with `flags` (everything but model, port and chat template) and `env` ("NAME=value"
    strings). Leaving the context manager stops the server's whole process group."""
    model = model_dir()
    port = processes.free_port()
    log = LOG_DIR / f"{name}.log"
    return port, log, processes.managed_process(server_command(model, port, flags, env), log)


@dataclass
class Server:
    name: str
    port: int
    log: Path
    proc: object  # subprocess.Popen

    def alive(self):
        return self.proc.poll() is None

    def log_text(self):
        return self.log.read_text(errors="replace") if self.log.is_file() else ""


@contextlib.contextmanager
def running_server(name, flags, env=(), timeout=STARTUP_TIMEOUT):
    """Start a server, wait until /health_generate answers 200 (it runs one token), yield a
    Server; stop it on exit. A failed start raises with the log's tail in the message."""
    port, log, process = start_server(name, flags, env)
    with process as proc:
        try:
            processes.wait_for_http_ok(url(port, "/health_generate"), proc, timeout=timeout)
        except Exception as e:
            raise RuntimeError(f"server {name!r} did not start ({e}); log {log}:\n"
                               f"{processes.log_tail(log, 60)}") from e
        yield Server(name, port, log, proc)


def greedy_body(ids, new_tokens):
    """/generate body: greedy decoding of exactly new_tokens tokens, with the top-2 logprobs."""
    return {"input_ids": ids, "return_logprob": True, "top_logprobs_num": 2,
            "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0.0,
                                "ignore_eos": True}}
