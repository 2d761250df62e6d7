"""Engine and sampling configuration: plain dataclasses validated on creation."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineConfig:
    device: str = "cpu"  # "cpu", "cuda", "cuda:1" or "auto"
    # None: fp32 on CPU (exact, token-identical to HF generate) and bf16 (fp16
    # where bf16 is missing) on CUDA. "auto": the same on CUDA; on CPU the engine
    # times the model's own matmuls in fp32, bf16 and fp16 at start and takes the
    # fastest that passes a quality check against fp32 (inference.formats).
    # Half precision is slow on CPUs without native support (no AVX512-BF16/AMX:
    # emulated) and 2-3x faster than fp32 on those with it (docs/BENCHMARKS.md).
    dtype: str | None = None
    # "int8": int8 matmul weights, int8 activations on CPU, weight-only on CUDA;
    # "int8_weight_only": the CUDA path anywhere (slower than fp32 on CPU);
    # "none": weights as loaded (inference.quantization, docs/BENCHMARKS.md).
    quantization: str = "none"
    # KV cache budget. On CUDA, when kv_cache_bytes is None, the cache takes
    # gpu_memory_fraction of the memory free after the weights are loaded.
    kv_cache_bytes: int | None = None
    gpu_memory_fraction: float = 0.8
    # 16 tokens a block keeps prefix-cache granularity fine and the waste of a
    # half-filled last block small; larger blocks only speed up the gather.
    block_size: int = 16
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512  # the per-step token budget (decode + prefill chunks)
    max_waiting: int = 256  # bounded queue: submit raises EngineSaturated beyond it
    max_model_len: int | None = None  # None: the model's max_position_embeddings, capped by the cache
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # torch intra-op threads; None keeps torch's default
    model_name: str | None = None  # reported by stats(); defaults to the model's name_or_path

    CPU_DEFAULT_KV_CACHE_BYTES = 512 * 2**20

    def __post_init__(self):
        if self.device == "auto":
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.dtype is None or self.dtype == "auto":
            if self.device.startswith("cuda"):
                import torch

                self.dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
            elif self.dtype is None:
                self.dtype = "float32"
            # else "auto" on CPU: the engine resolves it by measuring (inference.formats).
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}")
        if self.quantization not in ("none", "int8", "int8_weight_only"):
            raise ValueError(f"quantization must be none, int8 or int8_weight_only, not {self.quantization!r}")
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.max_waiting < 1:
            raise ValueError("max_waiting must be >= 1")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError("kv_cache_bytes must be positive")
        if not 0.0 < self.gpu_memory_fraction <= 1.0:
            raise ValueError("gpu_memory_fraction must be in (0, 1]")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("num_threads must be >= 1 (or None for torch's default)")


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    repetition_penalty: float = 1.0  # >1 discourages tokens already in prompt or output (CTRL style)
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    seed: int | None = None  # same seed, same output, whatever else is batched
    stop: list[str] | tuple[str, ...] | str | None = None  # stop strings, never emitted
    stop_token_ids: list[int] | tuple[int, ...] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; n >= 0: chosen token's logprob plus the top n
    extra: dict = field(default_factory=dict)  # ignored; room for callers' annotations

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.max_tokens is None or int(self.max_tokens) < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature is None or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is None or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is None or self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.repetition_penalty is None or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.presence_penalty is None or not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if any(not isinstance(s, str) for s in self.stop):
            raise ValueError("stop must be a string or a list of strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative integers")
        self.max_tokens = int(self.max_tokens)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
