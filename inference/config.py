"""Engine and sampling configuration: plain dataclasses validated on creation.

No torch at import: the gateway builds SamplingParams in processes that never
run an engine (the Celery worker, manage.py commands).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

DTYPE_NAMES = ("float32", "bfloat16", "float16")
# EngineConfig.quantization's values; inference.quantization implements them.
QUANTIZATIONS = ("none", "int8", "int8_weight_only", "int4_weight_only", "bf16_weight_only")

# Seeds are what a signed 64-bit integer holds, non-negative: torch's generator
# takes them, and a seed of 2**64 once made a whole engine step raise.
SEED_LIMIT = 2**63
# Stop strings are matched against every token's text: bound the work a request can ask for.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256


def resolve_device_and_dtype(device: str, dtype: str | None) -> tuple[str, str]:
    """The one place "auto" and None become a real device and dtype.

    device "auto" is CUDA when available, else the CPU. dtype None is fp32 on
    the CPU (exact: token-identical to HF generate) and bf16 on CUDA (fp16
    where bf16 is missing); "auto" is the same on CUDA, and stays "auto" on the
    CPU, where the engine measures the formats at start (inference.formats).
    Explicit values pass through unchanged.
    """
    if device == "auto" or (dtype in (None, "auto") and device.startswith("cuda")):
        # Imported here, not at module level: only engine processes resolve "auto".
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype in (None, "auto") and device.startswith("cuda"):
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if dtype is None:
        dtype = "float32"
    return device, dtype


@dataclass
class EngineConfig:
    device: str = "cpu"  # "cpu", "cuda", "cuda:1" or "auto"
    # None: fp32 on CPU (exact, token-identical to HF generate) and bf16 (fp16
    # where bf16 is missing) on CUDA. "auto": the same on CUDA; on CPU the engine
    # times the model's own matmuls in fp32, bf16 and fp16 at start and takes the
    # fastest that is 10% faster in total, no slower for one row, and passes a
    # quality check against fp32 (inference.formats).
    # Half precision is slow on CPUs without native support (no AVX512-BF16/AMX:
    # emulated) and 2-3x faster than fp32 on those with it (docs/BENCHMARKS.md).
    dtype: str | None = None
    # "int8": int8 matmul weights, int8 activations on CPU, weight-only on CUDA;
    # "int8_weight_only": int8 weights only; on CPU oneDNN's int8-weight kernel
    # with bf16 activations, the fastest for one chat and near-lossless;
    # "int4_weight_only": 4-bit layer weights in groups of 32 (bf16 activations
    # on CPU), about twice int8 weight-only's one-row speed, with a measured
    # quality loss (docs/BENCHMARKS.md);
    # "bf16_weight_only" (CPU, fp32): every matmul weight rounded to bf16,
    # activations and sums in fp32; one- and two-token steps read the bf16
    # copies in small_linear (half the bytes of fp32), larger steps multiply the
    # rounded weights in fp32, so batched still equals alone as in fp32;
    # "none": weights as loaded (inference.quantization, docs/BENCHMARKS.md).
    quantization: str = "none"
    # Under "bf16_weight_only" (or "int8_weight_only" in fp32, over the int8
    # weights times their scales rounded to bf16) on the CPU: the prompt's
    # tokens (by position, whatever chunk or step carries them) multiply bf16
    # activations by bf16 weights in oneDNN (AMX or AVX512-BF16) in blocks of
    # bf16_prompt_block rows, summed in fp32; generated tokens keep fp32
    # activations. On the 2-core AMX Xeon a 64-token prompt's layer matmuls took 29.7 against
    # 83.1 ms, 512 tokens' 172 against 374 ms (docs/BENCHMARKS.md "Prompts in
    # bf16"). Costs a packed bf16 copy of the layer weights (214 MB for
    # SmolLM2-135M). None: dtype "auto" decides by timing it at start (off
    # otherwise); True needs quantization "bf16_weight_only" or
    # "int8_weight_only" with fp32 activations.
    bf16_prompts: bool | None = None
    # Rows per oneDNN call of the prompt rows: a row's bits depend on the
    # call's row count, so it is fixed (inference.llama.bf16_block_linear).
    # 64 took 27-30 ms for prompts of 8 to 64 tokens, 128 took 36-39 ms there
    # and less beyond 100 tokens (the AMX Xeon).
    bf16_prompt_block: int = 64
    # Longer prompts go in calls of block × 2, × 4 ... up to this many rows,
    # each count only where a start-up check on the weight finds every row's
    # bits the same as in calls of bf16_prompt_block (inference.llama
    # same_bits_blocks): 512 tokens' layer matmuls took 60 against 93 ms on
    # the AMX Xeon (docs/BENCHMARKS.md "Larger calls for longer prompts").
    # bf16_prompt_block alone: no larger calls.
    bf16_prompt_max_block: int = 256
    # Shorter prompts go in calls of block ÷ 2, ÷ 4 ... down to this many
    # rows, on the same start-up check: where a CPU's library sums a row in
    # one order at every count (the Zen 5 EPYC: 8 to 256 rows alike), a
    # 12-token turn's layer matmuls take a 16-row call's 9 ms instead of a
    # 64-row call's 20, its prefill 13.8 ms instead of 26.3
    # (docs/BENCHMARKS.md "Short prompts in smaller calls"); where they
    # differ (the AMX Xeon: 7-32 against 33-129 rows), nothing changes.
    # bf16_prompt_block: no smaller calls.
    bf16_prompt_min_block: int = 8
    # With bf16 prompts, beside more than this many decoding sequences prompts
    # and decodes take steps by turns (inference.scheduler): a new chat's
    # prompt step is the bf16 pass alone. Never alternating, one chat every
    # 250 ms reached its first token at 85-114 ms against 49-56 beside more
    # than 8 decoding, and 32 x 32 tokens ran at 270 against 286 tok/s (AMX
    # Xeon). 0, not 8: beside 1 to 8 decoding sequences a step that mixed the
    # prompt took 25-34 ms where the prompt's own took 15-20 (the Zen 5
    # EPYC's chat server, one chat every 250 ms), and the decodes' step that
    # follows costs what their rows added to the mixed one: the engine
    # alone's first token came 19-21 ms after the submit against 24-29 ms
    # (bench.chat, four rounds each; docs/BENCHMARKS.md "Prompts' steps of
    # their own beside any decoding").
    prompt_steps_above: int = 0
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
    # Steps of at most this many token rows run on one thread (CPU, half
    # precision only; inference.threads). None: measured at start; 0: never.
    one_thread_rows: int | None = None
    # Steps run on the cores other processes leave free (CPU, the same formats
    # as one_thread_rows; inference.threads). Beside a CPU-bound process one
    # int4 stream went 14 -> 44 tok/s; alone it changed nothing
    # (docs/BENCHMARKS.md "Engine beside a busy neighbour").
    follow_cpu_load: bool = True
    # On the CPU, while the server admits a request (inference.arrivals), a
    # step that would only decode waits for its prompt, at most this long from
    # the request's arrival: the web work and the decode steps no longer slow
    # each other on the same cores, and the prompt's step starts at once.
    # One chat every 250 ms with about ten replies decoding (the 2-core Zen 5
    # EPYC, bench.chat, four rounds each): the web path added +39 to +60 ms
    # (median +51) to the first token against +64 to +73 (+70) without, the
    # 32-at-once share 74-76% against 71-79% (docs/BENCHMARKS.md "Decode
    # steps give way to a chat on its way"). 0: never wait. Not on CUDA,
    # whose steps barely use the CPU.
    arrival_hold_ms: float = 40.0
    # How long new text of streams already under way may wait for their
    # readers' wake-up, with max_num_seqs streams decoding; fewer streams
    # wait proportionally less (one alone, less than a step). The readers
    # then take several steps' tokens as one event, and the web work above
    # the engine runs once for them (inference.handle.WakeList). First text,
    # ends and aborts are never held. 0: wake the readers after every step.
    stream_pace_ms: float = 0.0
    # fp32 on the CPU: pack the matmul weights once for MKL's or oneDNN's GEMM
    # instead of letting MKL repack them on every call (inference.packing).
    # pack_backend "auto" times both on the model's shapes at start and keeps
    # the faster, or neither if F.linear is as fast: on the 2-core Xeon MKL's
    # packed sgemm ran layer matmuls 1.4-1.8x faster at 4-32 rows; on the
    # 2-core EPYC it gained nothing and oneDNN's ran 1.8-2.5x faster. The
    # unpacked copies are freed once the engine has started when it loaded the
    # model itself; SmolLM2-135M's RSS then grows by 1275 MiB packed for
    # oneDNN against 1019 unpacked on the EPYC (1539 before the copies were
    # freed). Ignored in other formats.
    pack_weights: bool = True
    pack_backend: str = "auto"  # "auto", "mkl" or "onednn"
    # CPU: decode attention reads the paged KV cache in place, in a small C++
    # library compiled at the first start for this CPU (inference.kernels),
    # instead of gathering every sequence's blocks into new tensors each step:
    # 30 layers' decode attention at 32 sequences took 7.7 ms against 26-48 ms.
    # Falls back to the gather where no compiler is found. kernel_dir keeps the
    # built library (None: a folder in the system's temporary directory).
    attention_kernel: bool = True
    # CPU, fp32 activations: steps of at most this many tokens run their
    # matmuls, lm_head included, in the same library's small_linear, one pass
    # over each plain weight row, instead of the GEMM library. On the 2-core
    # EPYC one forward's layer matmuls over fp32 weights took 19.7 ms at one
    # row and 20.8 at two against 25.0 and 28.0 for oneDNN on packed weights;
    # at three rows they were even, at four oneDNN was faster (bench.packing).
    # Over bf16 weights ("bf16_weight_only") on AVX-512 the copies are packed
    # for a GEMM-like inner loop (inference.kernels.pack_small_weight): a
    # forward's layer matmuls at 8 rows 10.5, at 32 rows 27.4 ms, against 26.8
    # and 37.9 for MKL's packed fp32 GEMM over the rounded weights on the AMX
    # Xeon (docs/BENCHMARKS.md "small_linear over packed bf16 weights"). None:
    # 64 there, 2 otherwise (inference.kernels.default_small_rows).
    # Under "int8_weight_only" in fp32 on AVX-512 the int8 weights and their
    # scales are packed the same way (inference.kernels.pack_small_int8) and
    # every step runs there, whatever this says but 0 (its bits must not
    # depend on a cut by row count): one row 1.9x faster than over packed
    # bf16, and 1.9-2.5x faster than oneDNN's int8 kernel from 1 to 256 rows.
    # The plain weights then stay beside packed copies (the memory
    # ModelRunner.release_float_weights would have freed), except under
    # "bf16_weight_only" and "int8_weight_only", where these steps read
    # copies of their own. 0 turns it off; at most
    # inference.kernels.SMALL_LINEAR_MAX_ROWS (8), or its _PACKED (64) over
    # weights packed for AVX-512 (inference.kernels.max_small_rows).
    small_linear_rows: int | None = None
    # CPU: each layer's RMSNorms, rotary embedding and SiLU * up run as one op
    # each of the same library (csrc/fused_ops.cpp) instead of about a dozen
    # small torch ops, whose dispatch and thread fork cost more than their
    # arithmetic on a decode step (docs/BENCHMARKS.md "Fused element-wise ops").
    # The same sums in the same precision; falls back to torch where the
    # library is not built.
    fused_ops: bool = True
    kernel_dir: str | None = None
    model_name: str | None = None  # reported by stats(); defaults to the model's name_or_path
    # False runs the decoder layers op by op from Python instead of as one
    # TorchScript call: only the GIL benchmark's baseline wants that (llama.py).
    script_layers: bool = True
    # CUDA only: replay decode-only steps from captured CUDA graphs (one launch
    # instead of hundreds; inference.cuda_graphs). Not yet run on a GPU (the
    # project's machines have none; tests/inference/test_engine_cuda.py checks
    # it where one is), hence off by default.
    cuda_graphs: bool = False

    CPU_DEFAULT_KV_CACHE_BYTES = 512 * 2**20

    def __post_init__(self):
        self.device, self.dtype = resolve_device_and_dtype(self.device, self.dtype)
        if self.dtype not in (*DTYPE_NAMES, "auto"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}")
        if self.pack_backend not in ("auto", "mkl", "onednn"):
            raise ValueError(f"pack_backend must be auto, mkl or onednn, not {self.pack_backend!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {self.quantization!r}")
        if self.quantization == "bf16_weight_only":
            # fp32 activations over bf16 weights: nothing to measure for "auto".
            if not self.device.startswith("cpu"):
                raise ValueError("quantization bf16_weight_only is for the CPU; on CUDA use dtype bfloat16")
            if self.dtype == "auto":
                self.dtype = "float32"
            if self.dtype != "float32":
                raise ValueError(f"quantization bf16_weight_only keeps fp32 activations: dtype must be float32 "
                                 f"or auto, not {self.dtype}")
        if self.bf16_prompts:
            if self.quantization not in ("bf16_weight_only", "int8_weight_only") or not self.device.startswith("cpu"):
                raise ValueError("bf16_prompts needs quantization bf16_weight_only or int8_weight_only (on the CPU)")
            if self.dtype not in ("float32", "auto"):
                raise ValueError(f"bf16_prompts is for fp32 activations: dtype must be float32 or auto, "
                                 f"not {self.dtype}")
        # 64: inference.kernels.SMALL_LINEAR_MAX_ROWS_PACKED (config imports no kernels); the runner
        # caps it at what small_linear takes over the weights at hand (max_small_rows).
        if self.small_linear_rows is not None and not 0 <= self.small_linear_rows <= 64:
            raise ValueError("small_linear_rows must be in [0, 64] (or None for the CPU's default)")
        if self.bf16_prompt_block < 1:
            raise ValueError("bf16_prompt_block must be >= 1")
        if self.bf16_prompt_max_block < self.bf16_prompt_block:
            raise ValueError("bf16_prompt_max_block must be >= bf16_prompt_block")
        if not 1 <= self.bf16_prompt_min_block <= self.bf16_prompt_block:
            raise ValueError("bf16_prompt_min_block must be in [1, bf16_prompt_block]")
        if self.prompt_steps_above < 0:
            raise ValueError("prompt_steps_above must be >= 0")
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
        if self.cuda_graphs and not self.device.startswith("cuda"):
            raise ValueError(f"cuda_graphs needs a CUDA device, not {self.device!r}")
        if self.one_thread_rows is not None and self.one_thread_rows < 0:
            raise ValueError("one_thread_rows must be >= 0 (or None to measure it)")
        if not 0.0 <= self.arrival_hold_ms <= 10_000.0:
            raise ValueError("arrival_hold_ms must be between 0 and 10000")
        if not 0.0 <= self.stream_pace_ms <= 1000.0:
            raise ValueError("stream_pace_ms must be between 0 and 1000")
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
        """Reject every value a step could choke on: a bad value must fail its
        own submit (ValueError), never a step that other requests share."""
        self.max_tokens = _integer("max_tokens", self.max_tokens, 1)
        self.temperature = _number("temperature", self.temperature)
        _check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        self.top_p = _number("top_p", self.top_p)
        _check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        self.top_k = _integer("top_k", self.top_k, 0)
        self.repetition_penalty = _number("repetition_penalty", self.repetition_penalty)
        _check(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        self.presence_penalty = _number("presence_penalty", self.presence_penalty)
        _check(-2.0 <= self.presence_penalty <= 2.0,
               f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if self.logprobs is not None:
            self.logprobs = _integer("logprobs", self.logprobs, 0)
            _check(self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.seed is not None:
            self.seed = _integer("seed", self.seed, 0)
            _check(self.seed < SEED_LIMIT, f"seed must be in [0, 2**63), got {self.seed}")
        self.stop = _stop_strings(self.stop)
        self.stop_token_ids = _stop_token_ids(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _number(name: str, value) -> float:
    """A finite real number: NaN fails every comparison, so a range check
    written as "reject when < 0" lets it through; infinities pass "> 0"."""
    _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
           f"{name} must be a finite number, got {value!r}")
    return float(value)


def _integer(name: str, value, minimum: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 256.0 from a JSON client means 256
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    _check(value >= minimum, f"{name} must be at least {minimum}, got {value}")
    return value


def _stop_strings(stop) -> list[str]:
    if isinstance(stop, str):
        stop = [stop]
    _check(isinstance(stop, (list, tuple, type(None))), "stop must be a string or a list of strings")
    _check(all(isinstance(s, str) for s in stop or ()), "stop must be a string or a list of strings")
    stop = [s for s in stop or () if s]
    _check(len(stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    _check(all(len(s) <= MAX_STOP_CHARS for s in stop), f"stop strings are at most {MAX_STOP_CHARS} characters")
    return stop


def _stop_token_ids(ids) -> list[int]:
    _check(isinstance(ids, (list, tuple, type(None))), "stop_token_ids must be a list of integers")
    ids = list(ids or ())
    _check(len(ids) <= MAX_STOP_TOKEN_IDS, f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(ids)}")
    _check(all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids),
           "stop_token_ids must be non-negative integers")
    return ids
