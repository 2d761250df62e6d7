"""Native kernels the engine compiles for the CPU it runs on (inference/csrc).

Decode attention over the paged KV cache (EngineConfig.attention_kernel): the
torch path copies every decoding sequence's K and V blocks into new tensors
(index_select) and runs SDPA over the copies, so a step writes the whole KV in
use and reads it twice. csrc/paged_attention.cpp reads each block where it
lies, through the block table. At 32 sequences of 128-160 tokens on the
2-core Xeon, 30 layers' decode attention took 7.7 ms against 26-48 ms for the
gather and SDPA (docs/BENCHMARKS.md "Decode attention in place").

Prefill attention in half precision (the same EngineConfig.attention_kernel):
csrc/prefill_attention.cpp reads a chunk's keys and values through its
sequence's block table, sums in fp32, and gives each row the same bits
however its prompt was chunked, which SDPA's bf16 kernel does not; the torch
path widened each chunk to fp32 for SDPA instead. On the 2-core Xeon, four
128-token prompts took 0.86 against 1.95 ms a layer, 512 queries after 1,536
tokens 12.0 against 18.6 ms (docs/BENCHMARKS.md "Prefill attention in place, half precision").
fp32 keeps SDPA, whose sums are HF generate's.

An encoder's attention over right-padded texts (padded_attention, in the same
source): retrieval's MiniLM in bf16 runs it instead of SDPA, whose CPU kernel
spent about a third of the six layers' time at a reply window's shape (about
100 tokens, twelve 32-wide heads) on about 5% of their FLOPs. A task is one
text, all its heads: its rows are read whole, once.

fp32 matmuls of a few rows (EngineConfig.small_linear_rows): one chat's decode
step multiplies one row by every weight, a stream of the model's weights that
torch's GEMM libraries read at about 17-18 GB/s on the 2-core EPYC (oneDNN on
packed weights; MKL unpacked about the same). csrc/small_linear.cpp reads each
plain weight row once and takes its dot product with each input row, at 22-24
GB/s, the rate a plain sum over the same weights reaches (docs/BENCHMARKS.md
"One stream's matmuls"). It also reads bf16 weights (quantization
"bf16_weight_only"), widened in registers: half the bytes, and a one-row
forward's matmuls in about half the fp32 time. On AVX-512 the bf16 copies
are packed (pack_small_weight: 16 output columns by two k steps a 64-byte
line), and up to 64 rows multiply them as a GEMM's inner loop does, each
output its own register lane's sum over k: a forward's layer matmuls at 32
rows 43.7 -> 27.4 ms on the 2-core AMX Xeon against the row-major loop, at one
row 11.2 -> 9.0 ms.

The greedy sampler's argmax over the logits (argmax below) runs in the
same source, one vectorised pass where torch's reduction was slow.

A layer's element-wise ops (EngineConfig.fused_ops): csrc/fused_ops.cpp runs
each RMSNorm, the rotary embedding and SiLU(gate) * up as one op that reads its
inputs once, instead of the torch path's handful of ops each (inference.
layer_ops), whose dispatch and OpenMP fork cost more than their arithmetic at
a decode step's few rows. Paired in one engine on the 2-core EPYC, one fp32
stream's decode step was 6.5-7.2% shorter with them and 32 sequences' 3.9-4.2%
(docs/BENCHMARKS.md "Fused element-wise ops").

No wheel ships such kernels for the pinned CPU torch, so they are built here:
the first engine in a process compiles the sources with the system's C++
compiler against the installed torch's headers (about 8 s on 2 quiet cores), keyed
by the source, torch version, flags and CPU, and later starts load the cached
library. Built with -march=native, hence for this CPU only: the key holds the
CPU's flags. Where there is no compiler, the build fails, or the library's
results disagree with the torch path on a test input, the engine logs why and
keeps the torch path: the kernel is an optimisation, never a requirement.

No Django here: the build directory comes in through EngineConfig.kernel_dir.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from inference import layer_ops

log = logging.getLogger(__name__)

# One library of every source: decode and half-precision prefill attention in
# place, an encoder's padded attention, fp32 matmuls of a few rows, and a
# layer's element-wise ops fused (RMSNorm, rotary, SiLU * up) beside the
# greedy sampler's argmax.
SOURCES = [Path(__file__).with_name("csrc") / name
           for name in ("paged_attention.cpp", "prefill_attention.cpp", "small_linear.cpp", "fused_ops.cpp")]
HEADERS = [Path(__file__).with_name("csrc") / "storage.h"]
# The most rows small_linear takes (csrc/small_linear.cpp's kMaxRows over fp32
# or row-major bf16 weights, kMaxPackedRows over packed bf16 or int8 ones).
SMALL_LINEAR_MAX_ROWS = 8
SMALL_LINEAR_MAX_ROWS_PACKED = 64
# Packed weights take any row count, in calls of SMALL_LINEAR_MAX_ROWS_PACKED
# rows that give each row the bits one call would: "every step" as a row count.
SMALL_LINEAR_ALL_ROWS = 2**31 - 1
# EngineConfig.small_linear_rows' default: over fp32 weights small_linear beat
# the GEMM libraries at one and two rows only (the 2-core EPYC, bench.packing);
# over packed bf16 weights it takes every count up to 64: a forward's layer
# matmuls (each layer's weights its own copy, as in a step) at 32 rows 27.4 ms
# against 37.9 for MKL's packed fp32 GEMM over the rounded weights on the AMX
# Xeon, at 64 rows 48.9 against 54.0, and the engine's steps past small_linear
# run those weights unpacked, lm_head included (docs/BENCHMARKS.md
# "small_linear over packed bf16 weights"). Packed int8 weights
# ("int8_weight_only" in fp32) take every step: half bf16's bytes, 2.2x faster
# than them at one row, even at 32, 10% slower at 64, and 1.9-2.5x faster than
# oneDNN's int8-weight kernel at 1 to 256 rows.
SMALL_ROWS_FP32 = 2
SMALL_ROWS_BF16_AVX512 = 64
# -ffast-math lets the compiler vectorise the dot products' sums and call
# glibc's vector exp; it is given to the compile step only, since at the link
# step GCC 12 would add crtfastmath.o, which turns on flush-to-zero for the
# whole process. The library links the OpenMP runtime torch already loaded
# (same soname), so the ops' OpenMP regions run on torch's own threads.
COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c++20", "-w"]
BUILD_TIMEOUT_S = 600

# The ops' schemas live here, not in the library: the scripted layer stack
# (inference.llama) refers to torch.ops.chatapp's ops and compiles against
# these schemas whether or not the library could be built.
_LIBRARY = torch.library.Library("chatapp", "DEF")
_LIBRARY.define("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, "
                "Tensor context_lens, float scale) -> Tensor")
_LIBRARY.define("small_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LIBRARY.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
_LIBRARY.define("silu_mul(Tensor gate_up) -> Tensor")
_LIBRARY.define("rotary(Tensor x, Tensor cos, Tensor signed_sin) -> Tensor")
_LIBRARY.define("argmax(Tensor logits) -> Tensor")
_LIBRARY.define("paged_prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor blocks, "
                "int context_len, float scale) -> Tensor")
_LIBRARY.define("padded_attention(Tensor q, Tensor k, Tensor v, Tensor lengths, float scale) -> Tensor")


def default_kernel_dir() -> Path:
    return Path(tempfile.gettempdir()) / "chatapp-kernels"


def default_small_rows(bf16_weights: bool) -> int:
    """The rows small_linear runs when EngineConfig.small_linear_rows is None
    (int8 weights aside: see ModelRunner._use_small_linear)."""
    if bf16_weights and _has_avx512():
        return SMALL_ROWS_BF16_AVX512
    return SMALL_ROWS_FP32


def can_pack_small(weight: torch.Tensor) -> bool:
    """Whether small_linear's packed loop takes this weight: bf16 [N, K] with
    N in whole 16-column blocks and K in pairs, on AVX-512."""
    return (weight.dtype == torch.bfloat16 and weight.dim() == 2 and weight.size(0) % 16 == 0
            and weight.size(1) % 2 == 0 and _has_avx512())


def pack_small_weight(weight: torch.Tensor) -> torch.Tensor:
    """bf16 [N, K] -> [N / 16, K / 2, 32] for small_linear's packed loop: block
    b, pair p holds, in 32-bit lane j, column 16 b + j's weights at k = 2 p
    (low half) and 2 p + 1 (high half), as csrc/small_linear.cpp reads them."""
    if not can_pack_small(weight):
        raise ValueError(f"small_linear cannot pack a {weight.dtype} weight of shape {tuple(weight.shape)} here")
    n, k = weight.shape
    return (weight.reshape(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()
            .view(n // 16, k // 2, 32))


def can_pack_small_int8(weight: torch.Tensor) -> bool:
    """Whether small_linear's packed loop takes this int8 weight: [N, K] with
    N in whole 16-column blocks and K in fours, on AVX-512."""
    return (weight.dtype == torch.int8 and weight.dim() == 2 and weight.size(0) % 16 == 0
            and weight.size(1) % 4 == 0 and _has_avx512())


def pack_small_int8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] with one scale per output column [N] -> [N / 16, K / 4 + 1, 64]
    int8 for small_linear's packed loop: block b, line p holds column 16 b + j's
    weight at k = 4 p + i in byte 16 i + j; the block's last line holds its 16
    scales as fp32, beside the weights they scale (as a GGUF block holds its
    own), as csrc/small_linear.cpp reads them."""
    if not can_pack_small_int8(weight) or scale.shape != (weight.size(0),):
        raise ValueError(f"small_linear cannot pack a {weight.dtype} weight of shape {tuple(weight.shape)} "
                         f"with scales of shape {tuple(scale.shape)} here")
    n, k = weight.shape
    lines = weight.reshape(n // 16, 16, k // 4, 4).permute(0, 2, 3, 1).reshape(n // 16, k // 4, 64)
    scales = scale.to(torch.float32).contiguous().view(torch.int8).view(n // 16, 1, 64)
    return torch.cat([lines, scales], dim=1).contiguous()


def small_copy(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 weight as small_linear reads it fastest: packed for its AVX-512 loop where it can be."""
    return pack_small_weight(weight) if can_pack_small(weight) else weight


def max_small_rows(weights: list[torch.Tensor]) -> int:
    """The most rows small_linear takes over all of these weights."""
    if weights and all(w.dim() == 3 for w in weights):
        return SMALL_LINEAR_ALL_ROWS
    return SMALL_LINEAR_MAX_ROWS


def _has_avx512() -> bool:
    # The library is built with -march=native: AVX-512 here means its packed loop is there.
    return " avx512f " in f" {_cpu_flags()} "


def _cpu_flags() -> str:
    # Not inference.formats.cpu_info: formats imports the model runner, which imports this module.
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: the build is not tried there (see _load)
        return ""
    return next((line for line in text.splitlines() if line.startswith("flags")), "")


def _compiler() -> str | None:
    return shutil.which("c++") or shutil.which("g++")


def _build_key(compiler: str) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256()
    for part in (*(source.read_bytes() for source in (*SOURCES, *HEADERS)), torch.__version__.encode(),
                 str(torch._C._GLIBCXX_USE_CXX11_ABI).encode(), " ".join(COMPILE_FLAGS).encode(),
                 version.encode(), _cpu_flags().encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _build(compiler: str, target: Path) -> None:
    """Compile SOURCES into target (atomically: concurrent builders each write their own temporary)."""
    from torch.utils import cpp_extension  # the installed torch's include and library paths

    target.parent.mkdir(parents=True, exist_ok=True)
    stem = target.parent / f".{target.stem}.{os.getpid()}"
    objects = [stem.with_suffix(f".{source.stem}.o") for source in SOURCES]
    lib = stem.with_suffix(".so")
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    libdirs = cpp_extension.library_paths()
    compiles = [[compiler, *COMPILE_FLAGS, abi, *includes, "-c", str(source), "-o", str(obj)]
                for source, obj in zip(SOURCES, objects)]
    link = [compiler, "-shared", "-fopenmp", *map(str, objects), "-o", str(lib),
            *(f"-L{d}" for d in libdirs), *(f"-Wl,-rpath,{d}" for d in libdirs), "-lc10", "-ltorch_cpu"]

    def run(command: list[str]) -> None:
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:2])} ... failed: {done.stderr[-2000:]}")

    try:
        # The sources compile side by side (each is seconds of one core, mostly
        # torch's headers); the first failure is raised.
        with ThreadPoolExecutor(max_workers=len(compiles)) as pool:
            for finished in [pool.submit(run, command) for command in compiles]:
                finished.result()
        run(link)
        os.replace(lib, target)
    finally:
        for obj in objects:
            obj.unlink(missing_ok=True)
        lib.unlink(missing_ok=True)


def reference_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_table: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The torch path's result for the op's arguments (q [B, H, D], caches
    [KV, blocks, block_size, D]): the library's self-check, and the tests'."""
    batch, kv_heads, block_size, dim = q.size(0), k_cache.size(0), k_cache.size(2), q.size(2)
    ctx = block_table.size(1) * block_size
    keys = k_cache.index_select(1, block_table.reshape(-1)).view(kv_heads, batch, ctx, dim).transpose(0, 1)
    values = v_cache.index_select(1, block_table.reshape(-1)).view(kv_heads, batch, ctx, dim).transpose(0, 1)
    mask = (torch.arange(ctx)[None] < context_lens[:, None]).view(batch, 1, 1, ctx)
    out = F.scaled_dot_product_attention(q.float().unsqueeze(2), keys.float(), values.float(), attn_mask=mask,
                                         scale=scale, enable_gqa=True)
    return out.squeeze(2).to(q.dtype)


def reference_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                blocks: torch.Tensor, context_len: int, scale: float) -> torch.Tensor:
    """The torch path's result for paged_prefill_attention's arguments (q [Q,
    H, D], the chunk's queries at the context's last Q positions): SDPA in
    fp32 over the gathered keys, causal. The library's self-check, and the tests'."""
    q_len, kv_heads, dim = q.size(0), k_cache.size(0), q.size(2)
    keys = k_cache.index_select(1, blocks).view(kv_heads, -1, dim)[:, :context_len].unsqueeze(0)
    values = v_cache.index_select(1, blocks).view(kv_heads, -1, dim)[:, :context_len].unsqueeze(0)
    mask = torch.arange(context_len)[None, :] <= torch.arange(context_len - q_len, context_len)[:, None]
    out = F.scaled_dot_product_attention(q.float().transpose(0, 1).unsqueeze(0), keys.float(), values.float(),
                                         attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1).to(q.dtype)


def reference_padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """The torch path's result for padded_attention's arguments (q, k, v [B,
    H, L, D], each text's keys its first lengths[b]): SDPA in fp32 with the
    padding masked, as [B, L, H, D], zero at the padding's own positions
    (which nothing reads). The library's self-check, and the tests'."""
    keep = torch.arange(q.size(2))[None, :] < lengths[:, None]
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=keep[:, None, None, :],
                                         scale=scale)
    return (out.transpose(1, 2) * keep[:, :, None, None]).to(q.dtype)


def _self_check() -> None:
    """The library against the torch path on a random input, in each dtype it serves."""
    generator = torch.Generator().manual_seed(0)
    kv_heads, heads, dim, block_size, num_blocks, batch = 2, 6, 64, 16, 24, 5
    lens = torch.tensor([1, 16, 17, 40, 64])
    table = torch.randperm(num_blocks, generator=generator)[:batch * 4].view(batch, 4)
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        q = torch.randn(batch, heads, dim, generator=generator).to(dtype)
        k = torch.randn(kv_heads, num_blocks, block_size, dim, generator=generator).to(dtype)
        v = torch.randn(kv_heads, num_blocks, block_size, dim, generator=generator).to(dtype)
        got = torch.ops.chatapp.paged_decode_attention(q, k, v, table, lens, dim ** -0.5).float()
        want = reference_decode_attention(q, k, v, table, lens, dim ** -0.5).float()
        error = (got - want).abs().max().item()
        if not error <= tolerance:  # also catches NaN
            raise RuntimeError(f"paged_decode_attention differs from the torch path by {error} in {dtype}")
    # A prefill chunk after earlier context, over scattered blocks, in each dtype.
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
        q = torch.randn(21, heads, dim, generator=generator).to(dtype)
        k = torch.randn(kv_heads, num_blocks, block_size, dim, generator=generator).to(dtype)
        v = torch.randn(kv_heads, num_blocks, block_size, dim, generator=generator).to(dtype)
        blocks = torch.randperm(num_blocks, generator=generator)[:4]
        got = torch.ops.chatapp.paged_prefill_attention(q, k, v, blocks, 50, dim ** -0.5).float()
        want = reference_prefill_attention(q, k, v, blocks, 50, dim ** -0.5).float()
        error = (got - want).abs().max().item()
        if not error <= tolerance:
            raise RuntimeError(f"paged_prefill_attention differs from the torch path by {error} in {dtype}")
    _check_padded_attention(generator)
    # 37 outputs (no whole 16-column blocks): the loops over fp32 and row-major bf16 weights.
    weight, bias = torch.randn(37, 96, generator=generator), torch.randn(37, generator=generator)
    for rows in range(1, SMALL_LINEAR_MAX_ROWS + 1):
        x = torch.randn(rows, 96, generator=generator)
        for w in (weight, weight.bfloat16()):
            for b in (None, bias):
                _check_small_linear(x, w, b, rows)
    # 48 outputs packed, three blocks of 16 (AVX-512): up to 64 rows, in groups of up to eight.
    weight, bias = torch.randn(48, 96, generator=generator).bfloat16(), torch.randn(48, generator=generator)
    if can_pack_small(weight):
        packed = pack_small_weight(weight)
        for rows in range(1, SMALL_LINEAR_MAX_ROWS_PACKED + 1):
            x = torch.randn(rows, 96, generator=generator)
            for b in (None, bias):
                _check_small_linear(x, weight, b, rows, packed)
    # The same shape in int8 with a scale per column (four k a line).
    codes = torch.randint(-127, 128, (48, 96), generator=generator, dtype=torch.int8)
    scale = torch.rand(48, generator=generator) / 64
    if can_pack_small_int8(codes):
        packed = pack_small_int8(codes, scale)
        for rows in (*range(1, SMALL_LINEAR_MAX_ROWS_PACKED + 1), 2 * SMALL_LINEAR_MAX_ROWS_PACKED + 3):
            x = torch.randn(rows, 96, generator=generator)
            for b in (None, bias):
                _check_small_linear(x, codes.float() * scale[:, None], b, rows, packed)
    _check_fused_ops(generator)


def _check_padded_attention(generator: torch.Generator) -> None:
    """An encoder's attention over padded texts against SDPA's, the heads a
    strided view as transformers passes them, in each dtype MiniLM runs."""
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        for dim in (32, 24):  # MiniLM's head size, and one without a fixed path
            q, k, v = (torch.randn(3, 37, 6, dim, generator=generator).to(dtype).transpose(1, 2) for _ in range(3))
            lengths = torch.tensor([37, 1, 20])
            got = torch.ops.chatapp.padded_attention(q, k, v, lengths, dim ** -0.5).float()
            want = reference_padded_attention(q, k, v, lengths, dim ** -0.5).float()
            error = (got - want).abs().max().item()
            if not error <= tolerance:
                raise RuntimeError(f"padded_attention differs from the torch path by {error} in {dtype}")


def _check_small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int,
                        packed: torch.Tensor | None = None) -> None:
    """small_linear against F.linear with the weight widened to fp32."""
    got = torch.ops.chatapp.small_linear(x, weight if packed is None else packed, bias)
    error = (got - F.linear(x, weight.float(), bias)).abs().max().item()
    if not error <= 1e-4:
        how = f"packed {packed.dtype}" if packed is not None else str(weight.dtype)
        raise RuntimeError(f"small_linear differs from F.linear by {error} at {rows} rows, {how} weights")


def _check_fused_ops(generator: torch.Generator) -> None:
    """The fused element-wise ops against the torch path's, in each dtype the engine runs."""
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
        for rows in (1, 3, 700):  # one row, a few, and enough to split between threads
            x = (torch.randn(rows, 200, generator=generator) * 3).to(dtype)
            weight = torch.randn(200, generator=generator).to(dtype)
            cases = {
                "rms_norm": (torch.ops.chatapp.rms_norm(x, weight, 1e-5), layer_ops.rms_norm(x, weight, 1e-5)),
                "silu_mul": (torch.ops.chatapp.silu_mul(x), layer_ops.silu_mul(x)),
            }
            qkv = torch.randn(rows, 5, 16, generator=generator).to(dtype)
            cos, sin = (torch.randn(rows, 1, 16, generator=generator).to(dtype) for _ in range(2))
            cases["rotary"] = (torch.ops.chatapp.rotary(qkv[:, :4], cos, sin), layer_ops.rotate(qkv[:, :4], cos, sin))
            for name, (got, want) in cases.items():
                error = ((got.float() - want.float()).abs() / (1 + want.float().abs())).max().item()
                if not (got.dtype == dtype and got.shape == want.shape and error <= tolerance):
                    raise RuntimeError(f"{name} differs from the torch path by {error} in {dtype} at {rows} rows")
    # The greedy pick: ties (the first), a NaN (counted largest), a row shorter than a vector.
    logits = torch.randn(5, 1000, generator=generator)
    logits[1, 7] = logits[1, 900] = logits[1].max() + 1
    logits[2, 500] = float("nan")
    for rows in (logits, logits[:, :9]):
        if not torch.equal(torch.ops.chatapp.argmax(rows), rows.argmax(-1)):
            raise RuntimeError("argmax differs from torch.argmax")


_loaded = False  # a library loaded stays loaded, for every later engine of the process


@functools.cache
def _load(kernel_dir: str) -> bool:
    # Tried once per process and directory.
    global _loaded
    if not sys.platform.startswith("linux"):
        log.info("native kernels: not built on %s; decode attention gathers blocks, few-row matmuls and "
                 "element-wise ops run in torch", sys.platform)
        return False
    compiler = _compiler()
    if compiler is None:
        log.warning("native kernels: no C++ compiler found; decode attention gathers blocks, few-row matmuls and "
                    "element-wise ops run in torch")
        return False
    try:
        target = Path(kernel_dir) / f"kernels-{_build_key(compiler)}.so"
        if target.exists():
            how = f"cached {target}"
        else:
            began = time.perf_counter()
            _build(compiler, target)
            how = f"built {target} in {time.perf_counter() - began:.1f} s"
        torch.ops.load_library(str(target))
        _self_check()
    except Exception as exc:  # any failure leaves the torch path, which is correct
        log.warning("native kernels unavailable (%s); decode attention gathers blocks, few-row matmuls and "
                    "element-wise ops run in torch", exc)
        return False
    log.info("native kernels (paged attention, small_linear, fused element-wise ops): %s", how)
    _loaded = True
    return True


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1) for fp32 rows [N, V]: the library's one pass where
    it is loaded and the logits are on the CPU (torch's reduction read
    SmolLM2's 32 x 49,152 logits in 1.9 ms on the 2-core Xeon), torch's
    otherwise. The same indices either way: the first maximum, NaN largest."""
    if _loaded and logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2 \
            and logits.size(1) > 0:
        return torch.ops.chatapp.argmax(logits)
    return logits.argmax(dim=-1)


# One build or load at a time in a process: an engine's start and MiniLM's
# load (retrieval's thread, moderation's shallow thread) may each ask first,
# and a build's temporary files are named by the process.
_load_lock = threading.Lock()


def load_kernels(kernel_dir: str | os.PathLike | None = None) -> bool:
    """Build or load the library (paged decode and prefill attention, an
    encoder's padded attention, small_linear, the fused element-wise ops,
    argmax); True when its ops are ready to run."""
    with _load_lock:
        return _loaded or _load(str(Path(kernel_dir) if kernel_dir else default_kernel_dir()))
