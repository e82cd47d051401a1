"""One settings object for moerge, read from env (MOERGE_*) and an optional TOML file.

The TOML file is `$MOERGE_CONFIG` if set, else `moerge.toml` in the working directory.
Environment variables win over the file; the file wins over the defaults.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDER_ID = "sentence-transformers/all-MiniLM-L6-v2"


def _default_home() -> Path:
    return Path(os.path.expanduser("~/.cache/moerge"))


def _toml_path() -> Path:
    return Path(os.environ.get("MOERGE_CONFIG", "moerge.toml"))


def cpu_core_list(spec: str) -> str | None:
    """`vllm_cpu_threads` as vLLM's core list: None for "auto" (vLLM decides), "0-N" for "all",
    a list like "0-3" or "0,2" as given; anything else is a ValueError."""
    if spec == "auto":
        return None
    if spec == "all":
        return f"0-{(os.cpu_count() or 1) - 1}"
    if not spec or not all(p.replace("-", "").isdigit() for p in spec.split(",")):
        raise ValueError(f"vllm cpu threads must be auto, all or a core list like 0-3 or 0,2, not {spec!r}")
    return spec


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MOERGE_", extra="forbid")

    home: Path = Field(default_factory=_default_home, description="cache folder for models and the pool")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the registry; default sqlite in home/pool"
    )
    pool_dir: Path | None = Field(default=None, description="artifact store; default home/pool")
    pool_url: str | None = Field(default=None, description="keep the pool's blobs in S3-compatible storage at "
                                 "this fsspec URL (s3://bucket/prefix; needs moerge[s3]) instead of in pool_dir, "
                                 "which keeps the lock, staging and a read cache. Credentials and endpoint: "
                                 "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL (docs/deployment.md)")
    pool_storage_options: dict = Field(default_factory=dict, description="keyword arguments of the fsspec "
                                       "filesystem of pool_url, as JSON (MOERGE_POOL_STORAGE_OPTIONS="
                                       "'{\"endpoint_url\": \"http://minio:9000\"}'); they win over the AWS_* variables")

    base_model_id: str = BASE_MODEL_ID
    max_upload_mb: float = Field(default=64.0, description="largest single adapter file accepted")
    max_esft_upload_mb: float = Field(default=1024.0, description="largest ESFT adapter weights file accepted "
                                      "(whole experts: about 5.3 MB each for SmolLM2-135M in bf16)")
    max_lora_rank: int = Field(default=256, ge=1)
    registry_busy_timeout_s: float = Field(default=5.0, gt=0, description="seconds a registry call waits for "
                                           "another process's lock (SQLite's database lock; with PostgreSQL, "
                                           "the pool's advisory lock or a row lock); past it, 503 with "
                                           "Retry-After and nothing changed")
    pool_poll_s: float = Field(default=1.0, ge=0, description="seconds between two looks at the registry's pool "
                               "version: an expert registered, updated or removed by another replica on the "
                               "same registry reaches this one's routers and engines within about this long "
                               "(docs/deployment.md). 0: never look (one process only)")
    bundled_pool: bool = Field(default=True, description="load the bundled expert library on first start")
    malloc_arena_max: int = Field(default=2, ge=0, description="glibc malloc arenas in the service process "
                                  "(0: glibc's default of 8 per core). Upload threads otherwise each grow an "
                                  "arena that fragments under expert churn (docs/reliability.md)")

    host: str = "127.0.0.1"
    port: int = 8000
    executor: str = Field(default="vllm", description="vllm | reference | servers. servers: the vLLM OpenAI servers "
                          "at engine_urls run base and single-adapter plans (placing adapters on them), the "
                          "reference engine the rest; it is the default when engine_urls is set and executor is not")
    engine_urls: list[str] = Field(default_factory=list, description="vLLM OpenAI servers used as engines "
                                   "(MOERGE_ENGINE_URLS='[\"http://127.0.0.1:8001\"]'); each started with --enable-lora "
                                   "and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, on a host that sees the pool folder "
                                   "(docs/deployment.md)")
    engine_max_loras: int = Field(default=4, ge=1, description="adapter slots per engine server: must match the "
                                  "servers' --max-loras")
    vllm_max_experts: int = Field(default=64, ge=1, description="LoRA experts resident in the vLLM engine at "
                                  "once (least recently used ones not in flight are evicted past that)")
    vllm_max_lora_rank: int = Field(default=64, ge=1, description="largest expert rank vLLM serves (higher "
                                    "ranks run on the reference engine, stated in the routing info)")
    vllm_max_num_seqs: int = Field(default=64, ge=1, description="requests in one vLLM batch")
    vllm_dtype: str = Field(default="auto", description="vLLM's compute dtype: auto (bfloat16 where the CPU has "
                            "native bf16 - avx512_bf16, AMX or Arm bf16 - else float32, which is 4x faster there; "
                            "moerge/compute.py) | bfloat16 | float32")
    moe_engine: str = Field(default="auto", description="auto | on | off: serve the pool's MoE base (`moerge moe "
                            "build`) in a second vLLM engine, for ESFT experts and the `moe` method. auto: when the "
                            "pool has one and the executor is vllm; on: fail to start without one")
    moe_adapter_rows: int = Field(default=16, ge=1, description="most physical expert rows per MoE layer for resident "
                                  "ESFT adapters' experts, allocated as adapters need them (a row in every layer is "
                                  "30 × 5.3 MB = 159 MB in bf16 for this base model); past that, idle adapters are evicted")
    moe_max_adapters: int = Field(default=8, ge=1, description="ESFT adapters resident in the MoE engine at once "
                                  "(least recently used idle ones are evicted past that, or when rows run out)")
    vllm_onednn_cache: int = Field(default=16, ge=1, description="oneDNN primitives the vLLM engine keeps in its "
                                   "process-wide caches (ONEDNN_PRIMITIVE_CACHE_CAPACITY and torch's "
                                   "LRU_CACHE_CAPACITY; both default to 1024). "
                                   "Each new batch shape adds primitives; with 1024 the engine's memory climbs for "
                                   "hours under varied load. vLLM's own per-layer caches still hold the recent ones "
                                   "(docs/reliability.md)")
    vllm_prefix_caching: bool = Field(default=True, description="reuse the KV of a prompt prefix an earlier "
                                      "request with the same plan computed (above all the instruction writer's fixed "
                                      "few-shot prefix, on every glider-global routing). Cached blocks are keyed by the "
                                      "plan's LoRA id, which names one set of expert versions; token-level plans get an "
                                      "id per request and never share; an ESFT adapter's plan has one id per adapter version, whichever rows its "
                                      "experts are loaded into")
    vllm_cpu_threads: str = Field(default="auto", description="vLLM CPU compute cores: auto (vLLM's default: "
                                  "on this 2-core machine one core, the other reserved) | all | a list like 0-3")
    routing_method: str = Field(default="glider-global", description="method used for model=auto")

    @field_validator("engine_urls")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        bad = [u for u in v if not u.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"engine urls must be http(s)://host:port, not {bad}")
        return [u.rstrip("/") for u in v]

    @field_validator("pool_url")
    @classmethod
    def _pool_url(cls, v: str | None) -> str | None:
        if v and "://" not in v:
            raise ValueError(f"pool url must be an fsspec URL like s3://bucket/prefix, not {v!r} "
                             "(a local folder is pool_dir)")
        return v or None

    @field_validator("vllm_cpu_threads")
    @classmethod
    def _cores(cls, v: str) -> str:
        cpu_core_list(v)
        return v

    @field_validator("vllm_dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        from moerge.compute import check_dtype
        return check_dtype(v)
    max_new_tokens_limit: int = 1024
    max_request_bytes: int = 32 * 1024 * 1024
    admin_key: str | None = Field(default=None, description="key for expert changes; none = open")
    api_keys: list[str] = Field(default_factory=list, description="user keys for chat; empty = open")
    rate_limit_per_minute: int = Field(default=0, description="per key; 0 = unlimited")
    max_streams_per_key: int = Field(default=0, ge=0, description="chat responses (streamed or not) one key may "
                                     "have open at once, 429 past it; 0 = unlimited")
    body_timeout_s: float = Field(default=120.0, gt=0, description="seconds a client has to send a whole request "
                                  "body, 408 past it")
    max_inflight: int = Field(default=256, ge=0, description="chat requests admitted at once over all keys; one "
                              "more gets 503 with Retry-After. 0 = unlimited")
    feedback_records: bool = Field(default=True, description="keep what each chat completion routed to, with "
                                   "its query text, so POST /v1/feedback can name it (the newest 10 000, none "
                                   "older than 7 days; feedback.sqlite beside a SQLite registry, else the "
                                   "registry's database); false: nothing is kept "
                                   "and /v1/feedback answers 503")
    request_timeout_s: float = Field(default=0.0, ge=0, description="seconds a chat request may take on the engine "
                                     "before it is aborted (504); 0 = no limit")
    remote_timeout_s: float = Field(default=60.0, gt=0, description="seconds a whole-model expert on another "
                                    "server has for a whole answer, or for each chunk of a streamed one; past it "
                                    "before any text went out, the base model answers (`fallback` says why); "
                                    "mid-stream, the stream ends with a 504 error")
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed to call the API from a "
                                    "browser; empty = no CORS headers at all")
    threads: int = Field(default=0, description="torch threads; 0 = torch default")
    reports_dirs: list[Path] = Field(default_factory=lambda: [Path("docs/results"), Path("runs")],
                                     description="folders whose report.json (in them or one level down) the "
                                     "console's Evaluation page and `moerge reports` show; relative to the cwd")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=_toml_path())
        return (init_settings, env_settings, toml)

    # Derived locations -------------------------------------------------------
    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def base_model_dir(self) -> Path:
        return self.models_dir / "SmolLM2-135M-Instruct"

    @property
    def pool_path(self) -> Path:
        return self.pool_dir or (self.home / "pool")

    @property
    def registry_url(self) -> str:
        return self.database_url or f"sqlite:///{self.pool_path / 'registry.sqlite'}"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_esft_upload_bytes(self) -> int:
        return int(self.max_esft_upload_mb * 1024 * 1024)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
