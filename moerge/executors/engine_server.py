"""How to start a stock vLLM OpenAI server that the servers executor (vllm_servers.py) can use as an
engine: the command, its environment, and a launcher that waits until it answers (tests, benchmarks).

What the executor needs from a server: runtime LoRA loading (`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`,
`--enable-lora`), `--max-loras` equal to moerge's `engine_max_loras`, a `--max-lora-rank` at least
the pool's largest rank, and read access to the pool folder (adapters are loaded by path). With
`--enable-prompt-tokens-details` a server reports the prompt tokens it took from its prefix cache (on by
default in vLLM's servers), and moerge passes them on in the usage of its answers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from moerge.compute import resolve_dtype


def server_command(model_dir: Path, port: int, *, max_loras: int = 4, max_lora_rank: int = 64,
                   dtype: str = "auto", max_model_len: int = 1024, host: str = "127.0.0.1",
                   served_name: str = "base") -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", served_name, "--host", host, "--port", str(port),
            "--dtype", resolve_dtype(dtype), "--max-model-len", str(max_model_len), "--enable-lora",
            "--max-loras", str(max_loras), "--max-cpu-loras", str(max_loras), "--max-lora-rank", str(max_lora_rank),
            "--enable-prompt-tokens-details"]


def server_env(cores: str | None = None, kv_cache_gib: int = 1, **extra: str) -> dict[str, str]:
    """The server's environment; `cores` ("0", "1", "0-1") pins its compute threads."""
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}
    if cores is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cores
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    env.update(extra)
    return env


class EngineServer:
    """A vLLM OpenAI server in its own process group, started and waited for; `stop` kills the group."""

    def __init__(self, model_dir: Path, port: int, *, log: Path | None = None, cores: str | None = None,
                 env: dict[str, str] | None = None, **options):
        self.url = f"http://127.0.0.1:{port}"
        self.argv = server_command(model_dir, port, **options)
        self.env = server_env(cores, **(env or {}))
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> "EngineServer":
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def wait(self, timeout_s: float = 900) -> "EngineServer":
        import httpx
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the vLLM server {self.url} exited during start-up (log: {self.log})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the vLLM server {self.url} did not start within {timeout_s:g} s")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        except ProcessLookupError:
            pass
