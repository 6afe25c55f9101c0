"""Server configuration: one pydantic model, filled from CLI flags (see `interpgw serve --help`)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class EngineConfig(BaseModel):
    model: str = Field("default", description="model folder or hub id; 'default' = SmolLM2-135M-Instruct")
    served_model_id: str | None = Field(None, description="id clients use; defaults to the folder name")
    dtype: str = Field("bfloat16", description="bfloat16 | float32 | float16")
    max_model_len: int | None = Field(2048, description="context length (None: the model's own)")
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = Field(None, description="tokens per step; small values force chunked prefill")
    enable_prefix_caching: bool = True
    kv_cache_gib: float = Field(2.0, description="KV cache size on CPU")
    max_logprobs: int = 20
    seed: int = 0
    # big models: passed through to vLLM (see docs/deploy.md for what is verified)
    tensor_parallel_size: int = Field(1, description="GPUs (ranks) one model's layers are split across")
    pipeline_parallel_size: int = Field(1, description="pipeline stages; captures and edits need 1")
    distributed_executor_backend: str | None = Field(None, description="mp (one node) | ray (multi-node); None: vLLM's")


class LimitsConfig(BaseModel):
    max_capture_bytes: int = Field(512 * 2**20, description="per request; beyond it RESOURCE_EXHAUSTED")
    max_trace_prompts: int = 256
    max_hooks: int = 4096
    max_new_tokens: int = 4096
    default_max_tokens: int = 64
    max_message_bytes: int = Field(64 * 2**20, description="largest request or response message on the wire")
    max_interventions: int = Field(32, description="per request, after expanding multi-hook registry vectors")
    max_edit_scale: float = Field(1000.0, description="bound on |scale| and |value| of an intervention")
    max_reference_prompts: int = 64
    max_train_pairs: int = 1024
    max_patch_runs: int = Field(8192, description="layers x positions of one Patch call")
    # admission: bounds on model-running calls (Generate, Trace, Patch, Train*) across all callers
    max_active_requests: int = Field(256, description="model-running calls served at once; more wait")
    max_queued_requests: int = Field(256, description="calls waiting for admission; more get RESOURCE_EXHAUSTED")
    # per API key defaults (a key's own limits override them; None: unlimited)
    key_requests_per_s: float | None = Field(None, description="calls per second per key")
    key_burst: int | None = Field(None, description="calls a key may make at once above its rate")
    key_max_concurrent: int | None = Field(None, description="calls in flight per key")
    key_capture_bytes_per_min: int | None = Field(None, description="captured activation bytes per key per minute")


class CacheConfig(BaseModel):
    max_bytes: int = Field(
        1024 * 2**20,
        description="in-process trace cache budget; with Redis, of the copies kept in front of it (0: none); "
        "Redis is bounded by its own maxmemory",
    )
    max_entry_bytes: int = Field(256 * 2**20, description="larger traces are not cached")
    ttl_s: float | None = Field(24 * 3600.0, description="cached traces expire after this (None: never)")
    stored_ttl_s: float | None = Field(7 * 24 * 3600.0, description="stored traces (handles) expire after this")


class AuthConfig(BaseModel):
    mode: str = Field("auto", description="auto: on unless listening on loopback only; on; off")
    api_keys_file: str | None = Field(None, description="YAML file of hashed keys (see `interpgw keys`)")
    api_keys_in_redis: bool = Field(False, description="keys in the --redis-url Redis (writable over the API)")
    key_cache_ttl_s: float = Field(10.0, description="seconds a verified key is trusted before asking the store again")


class TlsConfig(BaseModel):
    cert: str | None = Field(None, description="PEM server certificate chain; with key: serve TLS")
    key: str | None = Field(None, description="PEM private key of the certificate")
    client_ca: str | None = Field(None, description="PEM CA bundle; set: clients must present a certificate (mTLS)")


class ServerConfig(BaseModel):
    host: str = "127.0.0.1"
    port: int = 50051
    engine: EngineConfig = EngineConfig()  # the default model, and the engine settings every model shares
    more_models: list[tuple[str, str | None]] = Field(
        default_factory=list, description="further (model, served id) pairs, each with an engine of its own"
    )
    limits: LimitsConfig = LimitsConfig()
    redis_url: str | None = Field(
        None, description="redis://host:port/db for the registry, the trace cache and stored traces; None: in memory"
    )
    redis_prefix: str = Field("interpgw:", description="key prefix: deployments sharing one Redis stay apart")
    enable_fault_injection: bool = Field(False, description="test only: honour x-interpgw-fault metadata")
    startup_probe: bool = True
    metrics_host: str = Field("127.0.0.1", description="address of the Prometheus /metrics HTTP server")
    metrics_port: int = Field(9464, description="port of /metrics; 0: a free port; -1: no metrics")
    cache: CacheConfig = CacheConfig()
    auth: AuthConfig = AuthConfig()
    tls: TlsConfig = TlsConfig()

    def engine_configs(self) -> list[EngineConfig]:
        """One engine configuration per served model, the default model first."""
        more = [self.engine.model_copy(update={"model": m, "served_model_id": i}) for m, i in self.more_models]
        return [self.engine, *more]
