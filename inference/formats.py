"""Pick the CPU number format by measuring (EngineConfig.dtype = "auto" on CPU).

Half precision is 2-3x faster than fp32 on CPUs that do it natively (AMX or
AVX512-BF16 for bf16, AVX512-FP16/AMX-FP16 for fp16) and slower than fp32 on
CPUs that emulate it, so the choice is measured, not assumed:

1. read the CPU's flags; a half format without native support is not tried;
2. time the model's own linear shapes (in/out sizes of its nn.Linear layers,
   each weighted by how many layers have it) at 1 and 32 rows in each format,
   fp32 as the engine will run it (packed, and one-row steps in small_linear
   where its library loads);
3. try the formats faster than fp32 by at least MIN_SPEEDUP in total and no
   slower at either row count, fastest first, and take the first that passes
   a quality check against fp32 through the real model (QUALITY_BOUND); fp32
   when none does;
4. on fp32, where small_linear runs one-row steps: fp32 activations over
   weights rounded to bf16 (quantization "bf16_weight_only"), if its one-row
   matmuls are MIN_SPEEDUP faster, timed over a distinct copy of every
   layer's weight so that they stream from memory as in a decode step
   (time_streamed_one_row), and it passes the same check;
4b. on fp32, where small_linear packs int8 weights (AVX-512): fp32
   activations over int8 weights (quantization "int8_weight_only"), in place
   of the weights step 4 left, if its streamed one-row matmuls are
   MIN_SPEEDUP faster than theirs net of any loss at 32 rows, and it passes
   the same check (INT8_WEIGHTS);
5. with bf16 or int8 weights chosen and a native bf16 flag: the prompt's
   rows in bf16 blocks (EngineConfig.bf16_prompts), if a prompt's matmuls at
   PROMPT_ROWS rows are MIN_SPEEDUP faster that way than as they run
   otherwise (fp32, or int8 weights in small_linear), at each count, and the
   check passes with every linear layer's input, weight and output rounded
   to bf16 (the check is teacher-forced: every position is a prompt row
   there).

No Django here. The engine calls choose_cpu_format before it builds its runner
and keeps the report as Engine.format_report.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import platform
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from inference.kernels import (SMALL_LINEAR_ALL_ROWS, can_pack_small_int8, default_small_rows, pack_small_int8,
                               small_copy)
from inference.model_runner import DTYPES
from inference.llama import bf16_block_linear
from inference.packing import ONEDNN_PACKING, pack_weight, packed_matmul
from inference.quantization import quantize_weight

log = logging.getLogger(__name__)

# The flags that make a half format native; /proc/cpuinfo names.
NATIVE_FLAGS = {"bfloat16": ("amx_bf16", "avx512_bf16"), "float16": ("amx_fp16", "avx512_fp16")}
REPORTED_FLAGS = ("amx_bf16", "amx_fp16", "amx_int8", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni",
                  "avx512f", "avx2")
ROWS = (1, 32)  # one decoding sequence, and a full decode batch
# What time_streamed_one_row streams per format at most: more than any CPU's
# last-level cache, so the weights come from memory as in a decode step.
STREAM_BUDGET_BYTES = 512 * 2**20
# A reduced format must beat fp32 by 10% on the summed matmul time: fp32 is
# exact (token-identical to HF), so a gain within timing noise is not worth it.
# It must also be no slower at either row count. On the 2-core Xeon fp16 was
# 16% faster than fp32 at 32 rows and 13% slower at one in one start (45.3/13.5
# against 54.2/12.0 ms a forward), 5% and 1% faster in another, so the sum
# chose fp16 in one and fp32 in the other, while one stream's decode step did
# not differ (27.0-37.0 ms in fp16, 29.4-34.5 in fp32, three processes each;
# docs/BENCHMARKS.md). One chat at a time is what a self-hosted box serves
# most, and fp32 is exact: a format that gains only on batches, by a margin
# that comes and goes between starts, does not replace it.
MIN_SPEEDUP = 1.10
# fp32 activations and sums over weights rounded to bf16 (EngineConfig.quantization
# "bf16_weight_only"): where no half format is chosen, fp32's one- and two-row
# steps read half the bytes this way, its batches run as fp32's, and on
# SmolLM2-135M it kept fp32's greedy output on 12 of 12 held-out prompts
# (top-1 agreement 99.8%, perplexity -0.11%; bench.quality). It must be
# MIN_SPEEDUP faster at one row and pass the same quality check.
BF16_WEIGHTS = "bf16_weight_only"
# fp32 activations over int8 weights with a bf16 scale per output column
# (EngineConfig.quantization "int8_weight_only" where small_linear packs them,
# on AVX-512: every step runs there). Half bf16 weights' bytes: one stream's
# decode step on SmolLM2-135M 8.4-8.9 against 13.7-13.9 ms, a step of 32 rows
# 4-7% slower than theirs (the AMX Xeon); perplexity -0.14% (bench.quality).
# It replaces the weights otherwise chosen where its one-row matmuls streamed
# from memory are MIN_SPEEDUP faster than theirs net of any loss at 32 rows
# (int8_weights_gain: one chat is what a self-hosted box serves most, but a
# gain there must outweigh what full batches lose), and it passes the same
# quality check.
INT8_WEIGHTS = "int8_weight_only"
# EngineConfig.bf16_prompts, as the report names it.
BF16_PROMPTS = "bf16_prompts"
# Prompt lengths step 5 times: a short chat turn, and a long one in one step
# (EngineConfig.max_num_batched_tokens' default is 512).
PROMPT_ROWS = (64, 256)
# Quality check against fp32, teacher-forced over every position of the fixed
# prompts (about 70 positions for SmolLM2's tokenizer). On SmolLM2-135M bf16
# measured 0.97 top-1 agreement and a mean KL(fp32 || bf16) of 0.002 nats, fp16
# 1.00 and 0.00003. The KL bound, ten times bf16's, catches a systematic drift;
# the agreement bound is looser than bench.quality's 0.95 on a long text
# because here one flipped near-tie already moves it by 1.4 points. Together
# they reject a broken format (fp16 overflowing to inf/nan, a model whose
# logits move enough to change one token in ten) at the cost of ~0.1 s.
QUALITY_BOUND = {"min_top1_agreement": 0.90, "max_mean_kl": 0.02}
PROMPTS = (
    "The capital of France is Paris, and the capital of Italy is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "Water boils at 100 degrees Celsius at sea level. At higher altitudes, the boiling point",
)


@dataclass
class FormatReport:
    dtype: str  # the chosen format
    cpu: str
    flags: list[str]  # the REPORTED_FLAGS this CPU has
    # Summed matmul time of one forward's linear layers, microseconds: {format: {rows: us}}.
    matmul_us: dict[str, dict[int, float]] = field(default_factory=dict)
    quality: dict[str, dict] = field(default_factory=dict)  # {format: {agreement, mean_kl, passed}}
    skipped: dict[str, str] = field(default_factory=dict)  # {format: why it was not tried}
    fp32_packed: str = ""  # the packer fp32 was timed (and runs) with (inference.packing), or ""
    small_rows: int = 0  # fp32 row counts up to this were timed (and run) in small_linear
    quantization: str = "none"  # or BF16_WEIGHTS or INT8_WEIGHTS, chosen with dtype float32
    # One forward's one-row matmuls over weights streamed from memory, us: {format: us} (time_streamed_one_row).
    streamed_us: dict[str, float] = field(default_factory=dict)
    # A prompt's matmuls at PROMPT_ROWS rows, us: {"float32" | BF16_PROMPTS: {rows: us}} (step 5).
    prompt_us: dict[str, dict[int, float]] = field(default_factory=dict)
    bf16_prompts: bool = False  # chosen with BF16_WEIGHTS or INT8_WEIGHTS (EngineConfig.bf16_prompts)
    seconds: float = 0.0  # how long choosing took

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        times = ", ".join(f"{name} " + "/".join(f"{us / 1000:.2f}" for us in by_rows.values())
                          for name, by_rows in self.matmul_us.items())
        packed = f" (fp32 packed for {self.fp32_packed})" if self.fp32_packed else ""
        if self.small_rows:
            packed += f" (fp32 at <= {self.small_rows} rows in small_linear)"
        chosen = self.dtype if self.quantization == "none" else f"{self.dtype} with {self.quantization}"
        if self.bf16_prompts:
            chosen += ", prompts in bf16"
        if self.prompt_us:
            times += "; prompts at " + "/".join(map(str, PROMPT_ROWS)) + " rows: " + ", ".join(
                f"{name} " + "/".join(f"{us / 1000:.2f}" for us in by_rows.values())
                for name, by_rows in self.prompt_us.items())
        if self.streamed_us:
            times += "; one row streamed: " + ", ".join(f"{name} {us / 1000:.2f}"
                                                         for name, us in self.streamed_us.items())
        return (f"{chosen} (matmul ms per forward at {'/'.join(map(str, ROWS))} rows{packed}: {times}; "
                f"quality {self.quality}; skipped {self.skipped}; CPU {self.cpu} {' '.join(self.flags)}; "
                f"chosen in {self.seconds:.1f}s)")


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, set[str] | None]:
    """(model name, flags); flags None when unknown (not Linux/x86): then every format is tried."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return platform.processor() or platform.machine(), None
    name, flags = platform.machine(), None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name == platform.machine():
            name = value.strip()
        elif key.strip() == "flags" and flags is None:
            flags = set(value.split())
    return name, flags


def linear_shapes(model: torch.nn.Module) -> Counter:
    """{(in, out): how many nn.Linear layers have that shape}: the model's own matmuls."""
    return Counter((m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear))


def _matmul(x: torch.Tensor, weight: torch.Tensor, small_weight: torch.Tensor, packed: torch.Tensor | None,
            packer: str, small_rows: int) -> torch.Tensor:
    if x.size(0) <= small_rows and x.dtype == torch.float32:
        return torch.ops.chatapp.small_linear(x, small_weight, None)
    return F.linear(x, weight) if packed is None else packed_matmul(x, packed, weight, packer)


def time_matmuls(shapes: Counter, dtypes: list[str], rows=ROWS, rounds: int = 20,
                 budget_s: float = 0.3, pack_fp32: str = "", small_rows: int = 0) -> dict[str, dict[int, float]]:
    """Summed best time of x @ W^T over the shapes, per format and row count (us).
    Formats are interleaved within each round, so a burst of other load on the
    machine slows them alike rather than one of them, and the best of many
    rounds (up to `rounds`, at least 3, about budget_s per shape) filters out
    the bursts: on a shared 2-core box single timings varied 10-100x.
    pack_fp32 names the packer fp32 runs with in the engine (inference.packing),
    and small_rows the fp32 row counts that run in small_linear
    (inference.kernels, loaded by the caller), so that a half format is weighed
    against fp32 as it will run."""
    best: dict[tuple, float] = {}
    # The rows each format runs in small_linear in the engine: bf16 copies up to
    # their default, int8 ones every step (ModelRunner._use_small_linear).
    small_rows_of = {BF16_WEIGHTS: max(small_rows, default_small_rows(True)) if small_rows else 0,
                     INT8_WEIGHTS: SMALL_LINEAR_ALL_ROWS}
    for (n_in, n_out) in shapes:
        weight = torch.randn(n_out, n_in) * 0.02
        cases = []
        for name in dtypes:
            # BF16_WEIGHTS and INT8_WEIGHTS: fp32 as the engine runs it, but
            # small_linear reads bf16 or int8 copies.
            dtype = torch.float32 if name in small_rows_of else DTYPES[name]
            w = weight.to(dtype)
            if name == BF16_WEIGHTS:
                small = small_copy(weight.bfloat16())
            elif name == INT8_WEIGHTS:
                small = pack_small_int8(*quantize_weight(weight))
            else:
                small = w
            packed = pack_weight(w, pack_fp32) if pack_fp32 and dtype == torch.float32 else None
            cases += [((name, n, n_in, n_out),
                       lambda w=w, small=small, packed=packed, x=torch.randn(n, n_in, dtype=dtype),
                       rows_in_small=small_rows_of.get(name, small_rows): _matmul(x, w, small, packed, pack_fp32,
                                                                                 rows_in_small))
                      for n in rows]
        _time_interleaved(cases, best, rounds, budget_s)
    return _summed_us(best, shapes, dtypes, rows)


def _time_interleaved(cases: list, best: dict, rounds: int, budget_s: float) -> None:
    """Each (key, run) once to warm up (oneDNN builds its kernels on first
    use), then in turns over up to `rounds` rounds (at least 3, about budget_s
    in all), keeping each key's best time in `best` (seconds)."""
    for _key, run in cases:
        run()
    deadline = time.perf_counter() + budget_s
    for done in range(rounds):
        if done >= 3 and time.perf_counter() > deadline:
            break
        for key, run in cases:
            started = time.perf_counter()
            run()
            elapsed = time.perf_counter() - started
            best[key] = min(best.get(key, elapsed), elapsed)


def _summed_us(best: dict, shapes: Counter, names, rows) -> dict[str, dict[int, float]]:
    """{name: {rows: us}}: each shape's best (name, rows, in, out) time, weighted by its count of layers."""
    return {name: {n: round(sum(best[(name, n, i, o)] * count for (i, o), count in shapes.items()) * 1e6, 1)
                   for n in rows} for name in names}


def int8_packs(shapes: Counter) -> bool:
    """Whether small_linear packs int8 weights of every one of these (in, out) shapes here."""
    return all(can_pack_small_int8(torch.zeros(n_out, n_in, dtype=torch.int8)) for n_in, n_out in shapes)


def stream_plan(shapes: Counter, budget_bytes: int) -> dict[tuple[int, int], int]:
    """Copies of each shape's weight to stream: every layer's, or the same share
    of each shape's layers when their fp32 bytes exceed the budget (one at least)."""
    fp32_bytes = sum(n_in * n_out * 4 * count for (n_in, n_out), count in shapes.items())
    share = min(1.0, budget_bytes / max(fp32_bytes, 1))
    return {shape: max(1, round(count * share)) for shape, count in shapes.items()}


def time_streamed_one_row(shapes: Counter, rounds: int = 6,
                          budget_bytes: int = STREAM_BUDGET_BYTES) -> dict[str, float]:
    """One forward's one-row matmuls in small_linear (us), fp32, bf16 and
    (where they pack, on AVX-512) int8 weights, over distinct copies of the layers' weights, as a decode step
    streams the model from memory (small_linear's library loaded by the
    caller). time_matmuls reuses one weight per shape, which stays in cache:
    on the 2-core AMX Xeon (300 MiB L3) it put fp32 at one row 1.08-1.39x
    bf16 weights' time, and "auto" kept plain fp32 in some starts, while one
    stream's decode step ran 1.2-1.4x faster on bf16 weights. Each format
    streams at most budget_bytes of copies (a larger model's time is scaled
    from its share of them); they live only while they are timed."""
    plan = stream_plan(shapes, budget_bytes)
    names = ["float32", BF16_WEIGHTS]
    if int8_packs(shapes):
        names.append(INT8_WEIGHTS)
    layers = {}
    for name in names:
        pairs = []
        for (n_in, n_out), count in shapes.items():
            copies = plan[(n_in, n_out)]
            x, weight = torch.randn(1, n_in), torch.randn(n_out, n_in) * 0.02
            if name == BF16_WEIGHTS:
                weight = small_copy(weight.bfloat16())
            elif name == INT8_WEIGHTS:
                weight = pack_small_int8(*quantize_weight(weight))
            pairs += [(x, weight, count / copies)] + [(x, weight.clone(), count / copies) for _ in range(copies - 1)]
        layers[name] = pairs
    best = dict.fromkeys(layers, float("inf"))
    for _ in range(rounds):
        for name, pairs in layers.items():  # interleaved, as in time_matmuls
            elapsed = 0.0
            for x, weight, scale in pairs:
                started = time.perf_counter()
                torch.ops.chatapp.small_linear(x, weight, None)
                elapsed += (time.perf_counter() - started) * scale
            best[name] = min(best[name], elapsed)
    return {name: round(seconds * 1e6, 1) for name, seconds in best.items()}


def time_prompt_rows(shapes: Counter, block: int, rows=PROMPT_ROWS, pack_fp32: str = "", rounds: int = 10,
                     budget_s: float = 0.3, int8: bool = False) -> dict[str, dict[int, float]]:
    """A prompt's summed matmul time over the shapes (us) at each row count:
    fp32 as the engine runs it (packed for pack_fp32, or F.linear; int8: over
    int8 weights in small_linear, as under INT8_WEIGHTS), against bf16 blocks
    of `block` rows (inference.llama.bf16_block_linear, oneDNN). Interleaved,
    best of the rounds, as time_matmuls."""
    best: dict[tuple, float] = {}
    baseline = INT8_WEIGHTS if int8 else "float32"
    for (n_in, n_out) in shapes:
        weight = (torch.randn(n_out, n_in) * 0.02).bfloat16()
        widened = weight.float()
        fp32_packed = pack_weight(widened, pack_fp32) if pack_fp32 and not int8 else None
        int8_packed = pack_small_int8(*quantize_weight(widened)) if int8 else None
        half_packed = pack_weight(weight, "onednn", rows=block)
        cases = []
        for n in rows:
            x = torch.randn(n, n_in)
            if int8_packed is not None:
                cases.append(((baseline, n, n_in, n_out),
                              lambda x=x: torch.ops.chatapp.small_linear(x, int8_packed, None)))
            else:
                cases.append(((baseline, n, n_in, n_out), lambda x=x: F.linear(x, widened) if fp32_packed is None
                              else packed_matmul(x, fp32_packed, widened, pack_fp32)))
            cases.append(((BF16_PROMPTS, n, n_in, n_out), lambda x=x: bf16_block_linear(x, half_packed, None, [block])))
        _time_interleaved(cases, best, rounds, budget_s)
    return _summed_us(best, shapes, (baseline, BF16_PROMPTS), rows)


def bf16_prompts_gain(report: FormatReport) -> float:
    """How much faster a prompt's matmuls run in bf16 blocks than as they would
    otherwise (fp32, or int8 weights), at the row count where they gain least
    (0: not timed)."""
    times = report.prompt_us
    baseline = next((times[name] for name in times if name != BF16_PROMPTS), None)
    if not times.get(BF16_PROMPTS) or not baseline:
        return 0.0
    return min(baseline[n] / times[BF16_PROMPTS][n] for n in baseline)


def int8_weight(weight: torch.Tensor) -> torch.Tensor:
    """The fp32 weight "int8_weight_only" multiplies: int8 times its bf16 column scale."""
    codes, scale = quantize_weight(weight)
    return codes.float() * scale.bfloat16().float()[:, None]


def bf16_prompts_applied(model: torch.nn.Module, int8: bool = False):
    """Every nn.Linear of the model answers as the engine's prompt rows do:
    input and weight (int8: the dequantized int8 weight) rounded to bf16, the
    product summed in fp32 and rounded to bf16 (oneDNN's output), widened
    back; the lm_head as under its weights alone, as the engine's keeps fp32
    activations."""
    head = getattr(model, "lm_head", None)

    def rounded(module, x):
        weight = int8_weight(module.weight) if int8 else module.weight
        if module is head:
            return F.linear(x, weight if int8 else weight.bfloat16().float(), module.bias)
        y = F.linear(x.bfloat16().float(), weight.bfloat16().float()).bfloat16().float()
        return y if module.bias is None else y + module.bias

    return _linears_answering(model, rounded)


def fixed_prompts(model: torch.nn.Module, tokenizer=None) -> list[list[int]]:
    if tokenizer is not None:
        return [tokenizer.encode(text) for text in PROMPTS]
    generator = torch.Generator().manual_seed(0)  # no tokenizer: fixed random ids
    vocab = model.config.vocab_size
    return [torch.randint(0, vocab, (24,), generator=generator).tolist() for _ in PROMPTS]


@torch.inference_mode()
def prompt_logits(model: torch.nn.Module, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Next-token logits at every prompt position, fp32: one [len, V] per prompt."""
    return [model(torch.tensor([ids])).logits[0].float() for ids in prompts]


def compare_logits(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> dict:
    """Top-1 agreement and mean KL(reference || candidate) over all positions."""
    ref, cand = torch.cat(reference), torch.cat(candidate)  # [positions, V]
    agreement = (ref.argmax(-1) == cand.argmax(-1)).float().mean().item()
    kl = F.kl_div(cand.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    mean_kl = kl.mean().item()
    if not torch.isfinite(cand).all():
        agreement, mean_kl = 0.0, float("inf")
    passed = agreement >= QUALITY_BOUND["min_top1_agreement"] and mean_kl <= QUALITY_BOUND["max_mean_kl"]
    return {"agreement": round(agreement, 4), "mean_kl": round(mean_kl, 5), "passed": passed}


def candidate_order(matmul_us: dict[str, dict[int, float]]) -> list[str]:
    """Half formats at least MIN_SPEEDUP faster than fp32 in total and no slower
    at any row count, fastest first."""
    fp32 = matmul_us["float32"]
    total = {name: sum(by_rows.values()) for name, by_rows in matmul_us.items() if name in DTYPES}
    faster = [name for name in total if name != "float32" and total["float32"] >= MIN_SPEEDUP * total[name]
              and all(matmul_us[name][rows] <= fp32[rows] for rows in fp32)]
    return sorted(faster, key=total.get)


def bf16_weights_gain(report: FormatReport) -> float:
    """How much faster fp32 with bf16 weights multiplies one row than fp32, on
    weights streamed from memory (0: not timed)."""
    streamed = report.streamed_us
    if not streamed.get(BF16_WEIGHTS) or not streamed.get("float32"):
        return 0.0
    return streamed["float32"] / streamed[BF16_WEIGHTS]


def int8_weights_gain(report: FormatReport) -> float:
    """How much faster int8 weights multiply one row, streamed from memory, than
    the weights otherwise chosen (fp32, or bf16 copies), divided by how much
    slower they are at 32 rows (a full decode batch), if they are: the
    one-chat gain net of the batch loss (0: not timed). On the AMX Xeon the
    one-row gain over bf16 copies was 1.86x and the 32-row loss 1.10x
    (in-cache timings; a decode step of 32 rows 4-7% slower in the engine)."""
    streamed, matmuls = report.streamed_us, report.matmul_us
    current = report.quantization if report.quantization == BF16_WEIGHTS else "float32"
    if not streamed.get(INT8_WEIGHTS) or not streamed.get(current) or INT8_WEIGHTS not in matmuls:
        return 0.0
    batch = max(ROWS)
    loss = max(1.0, matmuls[INT8_WEIGHTS][batch] / matmuls[current][batch])
    return streamed[current] / streamed[INT8_WEIGHTS] / loss


def int8_weights_applied(model: torch.nn.Module):
    """Every nn.Linear of the model answers as under "int8_weight_only" in fp32:
    fp32 input times the int8 weight and its scale (int8_weight)."""
    return _linears_answering(model, lambda module, x: F.linear(x, int8_weight(module.weight), module.bias))


def bf16_weights_applied(model: torch.nn.Module):
    """Every nn.Linear of the model answers as if its weight were rounded to
    bf16, as "bf16_weight_only" rounds them (a tied embedding's lookups stay
    fp32, as in the engine)."""
    return _linears_answering(model, lambda module, x: F.linear(x, module.weight.bfloat16().float(), module.bias))


@contextlib.contextmanager
def _linears_answering(model: torch.nn.Module, answer):
    """Every nn.Linear's output replaced by answer(module, input) while the
    block runs. Forward hooks, one layer's rounded weight at a time: a rounded
    copy of the whole model would stay in the process's memory after the
    check (486 MiB more RSS for SmolLM2-135M)."""
    handles = [m.register_forward_hook(lambda module, args, _output: answer(module, args[0]))
               for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


class _QualityCheck:
    """The quality check against fp32 (compare_logits over the fixed prompts),
    fp32's logits computed once, at the first check."""

    def __init__(self, model: torch.nn.Module, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.prompts: list[list[int]] = []
        self.reference: list[torch.Tensor] | None = None

    def __call__(self, candidate: torch.nn.Module | None = None) -> dict:
        """The candidate's result (default: the model, as hooks make it answer now)."""
        if self.reference is None:
            self.prompts = fixed_prompts(self.model, self.tokenizer)
            self.reference = prompt_logits(self.model, self.prompts)
        return compare_logits(self.reference, prompt_logits(candidate or self.model, self.prompts))


def choose_cpu_format(model: torch.nn.Module, tokenizer=None, cpuinfo: Path = Path("/proc/cpuinfo"),
                      pack_fp32: str = "", small_rows: int = 0, prompt_block: int = 0) -> FormatReport:
    """Measure and choose; `model` is the fp32 model the engine will run (left
    unchanged). pack_fp32: the packer the engine will pack fp32 weights for
    (EngineConfig.pack_weights, inference.packing), so fp32 is timed packed;
    small_rows: fp32 steps of at most this many rows run in small_linear
    (EngineConfig.small_linear_rows, its library loaded), so they are timed
    there, and fp32 with bf16 or int8 weights is a candidate (steps 4 and 4b
    above); prompt_block: the rows per call of bf16 prompts (EngineConfig.
    bf16_prompt_block), 0 when they are not to be considered (step 5)."""
    started = time.monotonic()
    cpu, flags = cpu_info(cpuinfo)
    report = FormatReport("float32", cpu, sorted(f for f in REPORTED_FLAGS if flags and f in flags),
                          fp32_packed=pack_fp32, small_rows=small_rows)
    tried = ["float32"]
    for name, native in NATIVE_FLAGS.items():
        if flags is None or any(f in flags for f in native):
            tried.append(name)
        else:
            report.skipped[name] = f"no native support (none of {', '.join(native)})"
    if small_rows:
        tried.append(BF16_WEIGHTS)
        if int8_packs(linear_shapes(model)):
            tried.append(INT8_WEIGHTS)
    report.matmul_us = time_matmuls(linear_shapes(model), tried, pack_fp32=report.fp32_packed, small_rows=small_rows)
    check = _QualityCheck(model, tokenizer)
    for name in candidate_order(report.matmul_us):
        # A copy, so the fp32 weights stay exact should the check fail.
        report.quality[name] = check(copy.deepcopy(model).to(DTYPES[name]))
        if report.quality[name]["passed"]:
            report.dtype = name
            break
    if report.dtype == "float32" and small_rows:
        report.streamed_us = time_streamed_one_row(linear_shapes(model))
    # Steps 4 and 4b in turn: int8 weights are weighed against what step 4 left (int8_weights_gain).
    for name, gain, applied in ((BF16_WEIGHTS, bf16_weights_gain, bf16_weights_applied),
                                (INT8_WEIGHTS, int8_weights_gain, int8_weights_applied)):
        if report.dtype == "float32" and gain(report) >= MIN_SPEEDUP:
            with applied(model):
                report.quality[name] = check()
            if report.quality[name]["passed"]:
                report.quantization = name
    if report.quantization in (BF16_WEIGHTS, INT8_WEIGHTS) and prompt_block:
        _choose_bf16_prompts(report, model, flags, prompt_block, check)
    report.seconds = round(time.monotonic() - started, 2)
    log.info("number format: %s", report.summary())
    return report


def _choose_bf16_prompts(report: FormatReport, model: torch.nn.Module, flags: set[str] | None, prompt_block: int,
                         check: _QualityCheck) -> None:
    """Step 5: prompts in bf16 blocks, over the bf16 or int8 weights chosen."""
    native = NATIVE_FLAGS["bfloat16"]
    if not ONEDNN_PACKING:
        report.skipped[BF16_PROMPTS] = "no oneDNN linear in this torch"
    elif flags is not None and not any(f in flags for f in native):
        report.skipped[BF16_PROMPTS] = f"no native support (none of {', '.join(native)})"
    else:
        int8 = report.quantization == INT8_WEIGHTS
        report.prompt_us = time_prompt_rows(linear_shapes(model), prompt_block, pack_fp32=report.fp32_packed,
                                            int8=int8)
        if bf16_prompts_gain(report) >= MIN_SPEEDUP:
            with bf16_prompts_applied(model, int8=int8):
                report.quality[BF16_PROMPTS] = check()
            report.bf16_prompts = report.quality[BF16_PROMPTS]["passed"]
