"""The engine: a step loop on its own thread, fed by thread-safe submit/abort.

Callers on any thread submit requests and abort them; the engine thread
(inference.engine_loop) drains that inbox at each step boundary, schedules,
runs the model, samples, and pushes events to each request's handle.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import dataclasses
import logging
import threading
import time
import uuid
from typing import Callable

import torch

from inference.arrivals import release_current
from inference.block_manager import BlockManager
from inference.config import EngineConfig, SamplingParams
from inference.detokenizer import IncrementalDetokenizer
from inference.engine_loop import EngineLoop
from inference.formats import choose_cpu_format
from inference.handle import RequestHandle
from inference.kernels import SMALL_LINEAR_ALL_ROWS, SMALL_LINEAR_MAX_ROWS, default_small_rows, load_kernels
from inference.metrics import EngineMetrics
from inference.model_runner import DTYPES, ModelRunner
from inference.outputs import Completion, PromptTooLong
from inference.packing import can_pack, resolve_packer
from inference.sampler import Sampler
from inference.scheduler import Scheduler
from inference.sequence import Sequence

log = logging.getLogger(__name__)

_TOKENIZER_KWARGS = ("gguf_file", "revision", "trust_remote_code", "local_files_only", "cache_dir", "token")


def _trim_heap() -> None:
    """Hand the heap's free pages back to the OS once the engine is built.
    Choosing the format ("auto": timings on the model's shapes, a model copy
    for a half format's quality check) and packing leave hundreds of MB freed but
    kept by glibc's malloc: one SmolLM2-135M engine under "auto" grew by 1374
    MiB of anonymous memory, 1051 after malloc_trim (EPYC, docs/BENCHMARKS.md).
    Off glibc (no libc.so.6, or no malloc_trim in it) there is nothing to trim."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Engine:
    def __init__(self, model: torch.nn.Module | Callable[[], torch.nn.Module], tokenizer=None,
                 config: EngineConfig | None = None):
        """model: the HF module, or a function that loads it (from_pretrained
        passes one, so that the load too runs on the engine thread). A model
        the engine loads is its own: once the layer stack runs on quantized or
        packed copies, the float layer weights are freed and the HF module is
        left hollow. A module passed in stays whole."""
        self.config = config or EngineConfig()
        self.tokenizer = tokenizer
        self.step_observer = None  # callable(batch, duration_s): the benchmark's hook
        # callable(FinishEvent), on the engine thread after the event is delivered:
        # the metrics' hook (observability.engine); it must be cheap and not raise.
        self.finish_observer = None
        self._engine_loop = EngineLoop(self)
        # Every torch op of the engine runs on its own thread, the build (load,
        # format choice, quantization, the thread measurement) as well as the
        # steps, so that the engine thread holds the process's only OpenMP team.
        # libgomp lets a team's idle workers spin between parallel regions only
        # while it counts no more OpenMP threads than CPUs; a second team (the
        # constructing thread's, from the load's parallel copies) puts the
        # engine's workers to sleep after every region, and a one-row decode step
        # is ~250 regions of a few microseconds each. Built on the calling
        # thread, one fp32 stream's forward took 101 ms on the 2-core box; built
        # on the thread that runs it, 41 ms (docs/BENCHMARKS.md, "One OpenMP team").
        # The thread count is the caller's unless configured: torch keeps one
        # per OS thread, and a new thread starts from whatever count any thread
        # set last (an engine's one-thread step, say).
        threads = self.config.num_threads or torch.get_num_threads()
        self._engine_loop.start(lambda: self._build(model, threads))

    def _build(self, model, threads: int) -> None:
        """On the engine thread, before its loop: everything that runs torch work."""
        torch.set_num_threads(threads)
        owns_model = not isinstance(model, torch.nn.Module)  # loaded here: nobody else holds it
        if owns_model:
            model = model()
        # dtype "auto" is left unresolved only on CPU: measure and choose (inference.formats).
        self.format_report = None
        if self.config.dtype == "auto":
            packer, small_rows = "none", 0
            if self.config.quantization == "none":
                if self.config.pack_weights and can_pack(torch.device("cpu"), torch.float32):
                    packer, _choice = resolve_packer(self.config.pack_backend, model.config)
                # The runner loads the same library (once per process) and runs these rows there.
                if self.config.small_linear_rows != 0 and load_kernels(self.config.kernel_dir):
                    # fp32 is timed as it runs over its own weights.
                    small_rows = min(default_small_rows(False) if self.config.small_linear_rows is None
                                     else self.config.small_linear_rows, SMALL_LINEAR_MAX_ROWS)
            self.format_report = choose_cpu_format(
                model, self.tokenizer, pack_fp32="" if packer == "none" else packer, small_rows=small_rows,
                prompt_block=self.config.bf16_prompt_block if self.config.bf16_prompts is None else 0)
            # quantization is "none" here whenever small_rows is set: only then may the report pick bf16 weights.
            self.config = dataclasses.replace(
                self.config, dtype=self.format_report.dtype,
                quantization=self.format_report.quantization if small_rows else self.config.quantization,
                bf16_prompts=self.format_report.bf16_prompts if small_rows else self.config.bf16_prompts)
        self.model_name = self.config.model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.runner = ModelRunner(model, self.config)
        self.released_weight_bytes = self.runner.release_float_weights() if owns_model else 0
        if self.released_weight_bytes:
            log.info("freed %.0f MB of float layer weights the quantized or packed copies replace",
                     self.released_weight_bytes / 1e6)
        _trim_heap()
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.net.embed.shape[0]
        self.block_manager = BlockManager(self.runner.num_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching)
        # Prompts in bf16 take steps of their own beside many decoding sequences (inference.scheduler).
        self.scheduler = Scheduler(self.config, self.block_manager,
                                   prompt_steps_above=self.config.prompt_steps_above
                                   if self.runner.net.half_block else None)
        # Decode-only steps wait for a request the server is admitting (inference.arrivals), on the CPU only.
        self._engine_loop.hold_s = self.config.arrival_hold_ms / 1000 if self.runner.device.type == "cpu" else 0.0
        # Other model work in the process may run on this thread between steps (inference.lending).
        self._engine_loop.lends = self.runner.device.type == "cpu"
        self.sampler = Sampler()
        self.metrics = EngineMetrics()
        self.eos_token_ids = self._eos_ids(model, self.tokenizer)
        threading.current_thread().name = f"engine-{self.model_name}"

    @classmethod
    def from_pretrained(cls, name_or_path: str, config: EngineConfig | None = None, **load_kwargs) -> Engine:
        """A local dir, a hub id, or a GGUF file in a dir (gguf_file="name.gguf")."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = config or EngineConfig()
        tokenizer_kwargs = {k: v for k, v in load_kwargs.items() if k in _TOKENIZER_KWARGS}
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **tokenizer_kwargs)
        load_kwargs.setdefault("dtype", DTYPES.get(config.dtype, torch.float32))  # "auto": fp32, then measured
        if config.model_name is None:
            gguf_file = load_kwargs.get("gguf_file")
            config.model_name = (str(gguf_file).rsplit(".", 1)[0] if gguf_file
                                 else str(name_or_path).rstrip("/").split("/")[-1])
        # The weights load on the engine thread (see __init__).
        return cls(lambda: AutoModelForCausalLM.from_pretrained(name_or_path, **load_kwargs), tokenizer, config)

    @staticmethod
    def _eos_ids(model, tokenizer) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(model, "generation_config", None), model.config, tokenizer):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return ids

    # ---------------------------------------------------------- tokenizer help
    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer: pass prompts as token ids")
        return self.tokenizer

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        rendered = self._need_tokenizer().apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        return self._need_tokenizer().encode(rendered, add_special_tokens=False)

    def count_tokens(self, text: str) -> int:
        return len(self._need_tokenizer().encode(text, add_special_tokens=False))

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self._need_tokenizer().encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens; this model pool takes at most "
                                f"{self.max_model_len - 1} prompt tokens (context {self.max_model_len})")
        return ids

    # -------------------------------------------------------------- public API
    def submit(self, prompt, sampling_params: SamplingParams | None = None, request_id: str | None = None,
               priority: int = 0, cache_salt: str | None = None) -> RequestHandle:
        """Queue a request; thread-safe and non-blocking. priority: lower runs first
        (0 interactive, higher for background work). Raises EngineSaturated,
        PromptTooLong or ValueError synchronously."""
        return self._enqueue(prompt, sampling_params, request_id, priority, cache_salt, enforce_waiting_limit=True)

    def _enqueue(self, prompt, sampling_params: SamplingParams | None, request_id: str | None, priority: int,
                 cache_salt: str | None, *, enforce_waiting_limit: bool) -> RequestHandle:
        params = sampling_params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError("sampling_params must be an inference.SamplingParams")
        ids = self._prompt_ids(prompt)
        request_id = request_id or uuid.uuid4().hex
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        seq = Sequence(request_id, ids, params, priority=priority, cache_salt=cache_salt,
                       arrival_time=time.monotonic())
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, params.stop)
        # The caller's context (its request id, reply id ... as the logs bind
        # them): the engine thread logs this request's failures inside it. O(1).
        seq.log_context = contextvars.copy_context()
        seq.sink = RequestHandle(request_id, ids, loop, self._engine_loop.wake_list, self.abort)
        self._engine_loop.inbox.add(seq, enforce_waiting_limit=enforce_waiting_limit)
        release_current()  # the caller's request, if the server marked it on its way, has arrived
        return seq.sink

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Blocking batch API: one Completion per prompt (token ids or text), in order.
        Every prompt is queued at once, past max_waiting: the caller asked for the batch."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        handles = [self._enqueue(p, sp, request_id=None, priority=0, cache_salt=None, enforce_waiting_limit=False)
                   for p, sp in zip(prompts, sampling_params)]
        return [h.result() for h in handles]

    def abort(self, request_id: str) -> None:
        """End a request at the next step boundary (no-op when unknown or done)."""
        self._engine_loop.inbox.abort(request_id)

    @property
    def step_threads(self):
        """Which steps run on one thread, and the timings that chose it (inference.threads)."""
        return self.runner.step_threads

    def stats(self) -> dict:
        """Raises RuntimeError when the engine thread has died (health reports the pool down)."""
        down = self._engine_loop.down_reason
        if down is not None:
            raise RuntimeError(f"the engine is down: {down}")
        bm = self.block_manager
        return {
            "model": self.model_name,
            "device": str(self.runner.device),
            "dtype": self.config.dtype,
            "quantization": self.config.quantization,
            "packed_weights": self.runner.packed_weights,
            "weight_packing": self.runner.weight_packing,
            "attention_kernel": self.runner.net.attention_kernel,
            # Prompts' attention: the library's kernel, or SDPA (HF's sums, kept in fp32).
            "prefill_attention": "kernel" if self.runner.prefill_in_place else "sdpa",
            # "all": every step (int8 weights; see ModelRunner._use_small_linear).
            "small_linear_rows": ("all" if self.runner.net.small_rows == SMALL_LINEAR_ALL_ROWS
                                  else self.runner.net.small_rows),
            "bf16_prompts": self.runner.net.half_block > 0,
            # The row counts of its oneDNN calls, per matmul (qkv, o, gate_up, down).
            "bf16_prompt_blocks": [list(blocks) for blocks in self.runner.net.half_blocks],
            "fused_ops": self.runner.net.fused_ops,
            "one_thread_rows": self.runner.step_threads.one_thread_rows,
            "running": len(self.scheduler.running),
            "waiting": self._engine_loop.inbox.num_unscheduled + sum(1 for s in list(self.scheduler.waiting) if s.metrics.preemptions),
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_used": bm.num_used_blocks,
            "kv_blocks_free": bm.num_free_blocks,
            "kv_blocks_cached": len(bm.cached),
            "kv_block_size": bm.block_size,
            "kv_cache_usage": round(bm.num_used_blocks / bm.num_blocks, 4),
            "prefix_cache_hit_rate": round(bm.hit_rate, 4),
            "prefix_cache_hit_tokens": bm.hit_tokens,
            "prefix_cache_queried_tokens": bm.queried_tokens,
            "preemptions": self.scheduler.num_preemptions,
            # Decode steps that waited for a request being admitted, and how long in all (inference.arrivals).
            "arrival_holds": self._engine_loop.holds,
            "arrival_held_s": round(self._engine_loop.held_s, 3),
            # Other model work run on the engine's thread between steps, and its seconds (inference.lending).
            "lent_jobs": self._engine_loop.lent,
            "lent_s": round(self._engine_loop.lent_s, 3),
            # Readers' wake-ups (against "steps": paced ones carry several steps' tokens; inference.handle).
            "stream_pace_ms": self.config.stream_pace_ms,
            "stream_wakes": self._engine_loop.wake_list.wakes,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.config.max_num_seqs,
            "max_num_batched_tokens": self.config.max_num_batched_tokens,
            **self.metrics.snapshot(),
        }

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the loop; requests still live end with finish_reason "abort"."""
        self._engine_loop.stop(timeout_s)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
