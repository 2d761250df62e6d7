"""fp32 layer matmuls packed for MKL (by the row count packed for) or oneDNN, against F.linear.

    python -m bench.packing [--rounds 7] [--pack-rows 1,32,128,256] [--rows 1,4,8,16,32,64,128,512] [--no-write]

Over one forward's layer matmuls at SmolLM2-135M's shapes (fused QKV, o_proj,
fused gate/up, down_proj, each x30 with its own weight, as the engine's decode
step streams them) and the lm_head: `F.linear` (what the engine runs
unpacked; for the lm_head `torch.mm(W, x.T)`, which MKL ran faster), and `mkl._mkl_linear` on weights packed by
`mkl._mkl_reorder_linear_weight` for each --pack-rows, and oneDNN's
`mkldnn._linear_pointwise` on weights packed by `mkldnn._reorder_linear_weight`
for PACK_ROWS, and inference.kernels' small_linear on the plain weights (one
pass over each weight row, up to 8 rows), on bf16 copies of them (what
quantization "bf16_weight_only" reads; packed on AVX-512, at any row count,
else up to 8 rows) and on int8 copies with their scales (what
"int8_weight_only" in fp32 reads; packed, AVX-512 only), run at each --rows. The
contenders are interleaved in every round and the median of --rounds kept (the
box is shared). Prints a table (ms per forward) and writes the section
"fp32 weights packed for MKL or oneDNN (bench.packing)" of docs/BENCHMARKS.md, which
also says which PACK_ROWS inference.packing uses and why.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig

from bench import report
from bench.formats import engine_shapes
from inference.bootstrap import resolve_model
from inference import kernels
from inference.packing import MKL_PACKING, ONEDNN_PACKING, PACK_ROWS, pack_weight, packed_matmul
from inference.quantization import quantize_weight

HEADING = "## fp32 weights packed for MKL or oneDNN (bench.packing)"
ONEDNN = "oneDNN"
SMALL = "small_linear"  # inference.kernels' few-row op on the plain weights
SMALL_BF16 = "small_linear bf16"  # the same op on bf16 copies (quantization "bf16_weight_only"), packed as there
SMALL_INT8 = "small_linear int8"  # on int8 copies with their scales ("int8_weight_only"), packed (AVX-512 only)


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _contenders(pack_rows: list[int], small: tuple[str, ...] = ()) -> list[str]:
    return ["F.linear"] + [f"packed for {p}" for p in pack_rows] + ([ONEDNN] if ONEDNN_PACKING else []) + list(small)


def _small_contenders(n: int, halves: dict, int8s: dict) -> tuple[str, ...]:
    """The small_linear contenders that take n rows: the plain weights up to
    its row cap, the bf16 copies likewise unless every one is packed (then any
    count), the int8 copies (packed, where every one can be) at any count."""
    if not halves:  # no small_linear library
        return ()
    small = [SMALL] if n <= kernels.SMALL_LINEAR_MAX_ROWS else []
    if n <= kernels.SMALL_LINEAR_MAX_ROWS or all(w.dim() == 3 for ws in halves.values() for w in ws):
        small.append(SMALL_BF16)
    if int8s:
        small.append(SMALL_INT8)
    return tuple(small)


def _pack_key(contender: str):
    return ONEDNN if contender == ONEDNN else int(contender.rsplit(" ", 1)[1])


def measure(shapes: dict, pack_rows: list[int], rows: list[int], rounds: int, small_linear: bool = False) -> dict:
    """{(contender, rows): median ms of one forward's layer matmuls, and of the lm_head}; small_linear
    (inference.kernels' op, its library loaded) only at the rows it takes."""
    generator = torch.Generator().manual_seed(0)
    weights = {name: [torch.randn(n_out, n_in, generator=generator) * 0.02 for _ in range(count)]
               for name, (n_in, n_out, count) in shapes.items()}
    packs = {p: {name: [torch.ops.mkl._mkl_reorder_linear_weight(w, p) for w in ws] for name, ws in weights.items()}
             for p in pack_rows}
    if ONEDNN_PACKING:
        packs[ONEDNN] = {name: [pack_weight(w, "onednn") for w in ws] for name, ws in weights.items()}
    # The bf16 copies as the engine holds them: packed for small_linear's AVX-512 loop where it takes them.
    halves = ({name: [kernels.small_copy(w.bfloat16()) for w in ws] for name, ws in weights.items()}
              if small_linear else {})
    packable = all(kernels.can_pack_small_int8(torch.zeros(n_out, n_in, dtype=torch.int8))
                   for n_in, n_out, _count in shapes.values())
    int8s = ({name: [kernels.pack_small_int8(*quantize_weight(w)) for w in ws] for name, ws in weights.items()}
             if small_linear and packable else {})
    results: dict = {}
    for n in rows:
        contenders = _contenders(pack_rows, _small_contenders(n, halves, int8s))
        inputs = {name: torch.randn(n, n_in, generator=generator) for name, (n_in, _o, _c) in shapes.items()}
        samples: dict = {(c, part): [] for c in contenders for part in ("layers", "lm_head")}
        for _round in range(rounds + 1):  # the first round warms up and is dropped
            for contender in contenders:
                pack = None if contender in ("F.linear", SMALL, SMALL_BF16, SMALL_INT8) else packs[_pack_key(contender)]
                for part in ("layers", "lm_head"):
                    names = ["lm_head"] if part == "lm_head" else [k for k in shapes if k != "lm_head"]
                    started = time.perf_counter()
                    for name in names:
                        x = inputs[name]
                        for index, w in enumerate(weights[name]):
                            if contender == SMALL:
                                torch.ops.chatapp.small_linear(x, w, None)
                            elif contender == SMALL_BF16:
                                torch.ops.chatapp.small_linear(x, halves[name][index], None)
                            elif contender == SMALL_INT8:
                                torch.ops.chatapp.small_linear(x, int8s[name][index], None)
                            elif pack is None and name == "lm_head":
                                torch.mm(w, x.t()).t().contiguous()  # the engine's unpacked lm_head
                            elif pack is None:
                                F.linear(x, w)
                            elif contender == ONEDNN:
                                packed_matmul(x, pack[name][index], w, "onednn")
                            else:
                                torch.ops.mkl._mkl_linear(x, pack[name][index], w, None, n)
                    if _round:
                        samples[(contender, part)].append((time.perf_counter() - started) * 1e3)
        for (contender, part), values in samples.items():
            results[(contender, part, n)] = statistics.median(values)
        print(n, {f"{c} {p}": round(results[(c, p, n)], 2) for c in contenders for p in ("layers", "lm_head")},
              flush=True)
    return results


def render(results: dict, pack_rows: list[int], rows: list[int], command: str, info: dict) -> str:
    contenders = _contenders(pack_rows, tuple(c for c in (SMALL, SMALL_BF16, SMALL_INT8)
                                              if any(key[0] == c for key in results)))
    labels = ["unpacked"] + [c.replace("packed for", "MKL packed for")
                             if c not in (ONEDNN, SMALL, SMALL_BF16, SMALL_INT8)
                             else f"oneDNN packed for {PACK_ROWS}" if c == ONEDNN
                             else f"small_linear (plain weights, ≤ {kernels.SMALL_LINEAR_MAX_ROWS} rows)" if c == SMALL
                             else "small_linear (bf16 copies, packed on AVX-512: bf16_weight_only)" if c == SMALL_BF16
                             else "small_linear (int8 copies and scales, packed: int8_weight_only)"
                             for c in contenders[1:]]
    lines = [HEADING, "", f"Command: `{command}`.", "", report.machine_header(info), "",
             "Median ms of one forward's matmuls at SmolLM2-135M's shapes, each weight its own tensor (as a decode "
             "step streams them), contenders interleaved in every round; in brackets, the unpacked time over the "
             "contender's. Unpacked is what the engine runs with ENGINE_PACK_WEIGHTS=false: F.linear, and for the "
             f"lm_head W @ xᵀ. inference.packing packs for {PACK_ROWS} rows, for the packer it measures faster "
             "at start (EngineConfig.pack_backend).", ""]
    for part, title in (("layers", "layer matmuls (QKV, o_proj, gate/up, down; ×30)"), ("lm_head", "lm_head")):
        lines += [f"**{title}**", "", report.row("rows", *labels), "|" + "---|" * (len(contenders) + 1)]
        for n in rows:
            base = results[("F.linear", part, n)]
            cells = [f"{base:.2f}"] + [f"{results[(c, part, n)]:.2f} ({base / results[(c, part, n)]:.2f}×)"
                                       if (c, part, n) in results else "—" for c in contenders[1:]]
            lines.append(report.row(n, *cells))
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models-dir", default="var/models")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--pack-rows", type=_ints, default=[1, 32, 128, 256])
    parser.add_argument("--rows", type=_ints, default=[1, 4, 8, 16, 32, 64, 128, 512])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    if not MKL_PACKING:
        raise SystemExit("this torch has no MKL sgemm packing: nothing to measure")  # oneDNN is only beside it
    if args.threads:
        torch.set_num_threads(args.threads)
    info = report.machine_info()
    model_dir = resolve_model("bundled:smollm2", Path(args.models_dir))
    shapes = engine_shapes(AutoConfig.from_pretrained(model_dir))
    small_linear = kernels.load_kernels()
    with torch.inference_mode():
        results = measure(shapes, args.pack_rows, args.rows, args.rounds, small_linear)
    markdown = render(results, args.pack_rows, args.rows, report.command_line("bench.packing", argv), info)
    print(markdown)
    if not args.no_write:
        report.write_section(markdown, HEADING)
        print(f"wrote the section to {report.BENCHMARKS_MD}")


if __name__ == "__main__":
    main()
