"""Quality of number formats on the bundled SmolLM2-135M-Instruct.

    python -m bench.quality [--models-dir var/models] [--no-write]

For fp32, bf16, fp16, int8 weights (the CPU paths of int8 and
int8_weight_only, and the CUDA path, dequantized weights, run on CPU) and int4
weights (int4_weight_only: the CPU kernel and the CUDA path) it measures

- perplexity on a public-domain text shipped here (bench/data), teacher-forced
  through the HF model cast to the format; the quantized rows swap every
  nn.Linear for the engine's own kernels (inference.quantization), the
  lm_head kept at int8 weight-only in the int4 rows as the engine keeps it;
- on the same text, teacher-forced, how often the format's most likely next
  token is fp32's (top-1 agreement);
- greedy agreement with fp32 through the real engine on a dozen held-out chat
  prompts (not the prompts inference.formats checks at start-up): how many
  outputs are identical, and the mean share of each fp32 output that the
  format reproduces before its first differing token;

prints a table and writes the "Quality of number formats" section of
docs/BENCHMARKS.md. A format may become a default only within QUALITY_BOUND.
"""
from __future__ import annotations

import argparse
import copy
import math
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.sections import replace_section
from inference import Engine, EngineConfig, SamplingParams
from inference.bootstrap import resolve_model
from inference.formats import cpu_info, int8_weight
from inference.model_runner import DTYPES
from inference.quantization import (dequantized_int4_linear, dequantized_linear, int4_linear, int8_linear,
                                    pack_int4, quantize_weight, quantize_weight_int4)

HEADING = "## Quality of number formats (bench.quality)"
TEXT = Path(__file__).parent / "data" / "pride_and_prejudice_ch1.txt"
BENCHMARKS = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"
MAX_TOKENS = 48
# (label, EngineConfig dtype, quantization)
VARIANTS = [("fp32", "float32", "none"), ("bf16", "bfloat16", "none"), ("fp16", "float16", "none"),
            ("int8 (fp32 activations)", "float32", "int8"), ("int8 + bf16", "bfloat16", "int8"),
            ("int8 weight-only, fp32 activations (small_linear: AVX-512, what auto may pick)", "float32",
             "int8_small"),
            ("int8 weight-only, prompts in bf16 (their matmuls' inputs and outputs rounded)", "float32",
             "int8_prompts"),
            ("int8 weight-only, bf16 activations (oneDNN: CPUs without AVX-512)", "float32", "int8_weight_only"),
            ("int8 weight-only, CUDA path (dequantized)", "float32", "dequantized"),
            ("int4 weight-only, groups of 32 (bf16 activations)", "float32", "int4_weight_only"),
            ("int4 weight-only, CUDA path (dequantized)", "float32", "int4_dequantized"),
            ("bf16 weights (fp32 activations and sums)", "float32", "bf16_weight_only"),
            # EngineConfig.bf16_prompts: teacher-forced, every position is a prompt row.
            ("bf16 weights, prompts in bf16 (their matmuls' inputs and outputs rounded)", "float32", "bf16_prompts")]
# The rows with no CPU engine path of their own (the engine on CPU runs the CPU kernels).
NO_ENGINE = ("dequantized", "int4_dequantized")
# A format may be a default only if, on the text and against fp32, perplexity
# rises by at most 1% (0.01 nats of cross-entropy per token) and the most
# likely next token stays fp32's at 95% of positions or more. Both are
# teacher-forced: each position is scored on the true text, so one changed
# token does not rewrite the positions after it. Free-running greedy agreement
# is reported but is no bound: decoding amplifies any change (one flipped
# near-tie rewrites the rest of the output), so on this 135M model even bf16,
# whose perplexity is fp32's within 0.2%, keeps under half of fp32's tokens
# before the first difference. The model itself predicts the text's next token
# at well under 95% of positions (the "next-token accuracy" column), so a format
# within the bound changes its predictions far less than the model errs.
QUALITY_BOUND = {"max_perplexity_rise": 0.01, "min_top1_agreement": 0.95}
HELD_OUT_PROMPTS = [
    "What is the boiling point of water in Fahrenheit?",
    "Give me three tips for sleeping better.",
    "Explain what a prime number is to a ten-year-old.",
    "Write a haiku about autumn leaves.",
    "What is the difference between weather and climate?",
    "Translate 'good morning' into Spanish and French.",
    "Suggest a name for a small bakery.",
    "How do I reverse a list in Python?",
    "Why is the sky blue?",
    "List the planets of the solar system in order.",
    "What should I pack for a weekend hiking trip?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
]


class QuantLinear(torch.nn.Module):
    """An nn.Linear replaced by the engine's quantized kernel (same weights, same math)."""

    def __init__(self, linear: torch.nn.Linear, quantization: str):
        super().__init__()
        self.bias = linear.bias
        self.quantization = quantization
        if quantization in ("bf16_weight_only", "bf16_prompts"):
            self.weight_rounded = linear.weight.detach().bfloat16().float()  # a copy: a tied embedding stays fp32
        elif quantization in ("int8_small", "int8_prompts"):
            # What small_linear multiplies: int8 times its bf16 scale, in fp32 (inference.formats.int8_weight).
            self.weight_dequantized = int8_weight(linear.weight.detach())
            self.weight_rounded = self.weight_dequantized.bfloat16().float()  # the bf16 prompts' copy
        elif quantization in ("int4_weight_only", "int4_dequantized"):
            codes, scales_offsets = quantize_weight_int4(linear.weight)
            if quantization == "int4_weight_only":
                self.weight_int4, self.scales_offsets = pack_int4(codes, scales_offsets, torch.device("cpu"))
            else:  # the layout pack_int4 keeps off the CPU
                self.weight_int4, self.scales_offsets = codes.to(torch.uint8), scales_offsets
        else:
            self.weight_int8, self.scale = quantize_weight(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.quantization == "bf16_weight_only":
            out = F.linear(x, self.weight_rounded, self.bias)
        elif self.quantization == "int8_small":
            out = F.linear(x, self.weight_dequantized, self.bias)
        elif self.quantization in ("bf16_prompts", "int8_prompts"):  # as inference.llama.bf16_block_linear
            out = F.linear(x.bfloat16().float(), self.weight_rounded).bfloat16().float()
            out = out if self.bias is None else out + self.bias
        elif self.quantization == "int4_weight_only":
            out = int4_linear(x, self.weight_int4, self.scales_offsets, self.bias)
        elif self.quantization == "int4_dequantized":
            out = dequantized_int4_linear(x, self.weight_int4, self.scales_offsets)
            out = out if self.bias is None else out + self.bias
        elif self.quantization == "dequantized":
            out = dequantized_linear(x, self.weight_int8, self.scale)
            out = out if self.bias is None else out + self.bias
        else:
            out = int8_linear(x, self.weight_int8, self.scale, self.bias, self.quantization == "int8_weight_only")
        return out.view(*shape[:-1], -1)  # [..., out]


def hf_variant(model, dtype: str, quantization: str):
    variant = copy.deepcopy(model).to(DTYPES[dtype])
    if quantization != "none":
        for parent in list(variant.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    # The engine keeps the lm_head at int8 weight-only under int4 (inference.quantization).
                    head = name == "lm_head" and (quantization.startswith("int4")
                                                  or quantization in ("bf16_prompts", "int8_prompts"))
                    if head and quantization == "bf16_prompts":
                        kind = "bf16_weight_only"  # the lm_head keeps fp32 activations
                    elif head and quantization == "int8_prompts":
                        kind = "int8_small"
                    elif head:
                        kind = "int8_weight_only" if quantization == "int4_weight_only" else "dequantized"
                    else:
                        kind = quantization
                    setattr(parent, name, QuantLinear(child, kind))
    return variant.eval()


@torch.inference_mode()
def text_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0, :-1].float()  # [L - 1, V]: predictions of ids[1:]


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    return math.exp(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item())


# The engine settings of the rows whose names are not EngineConfig.quantization's.
ENGINE_SETTINGS = {"bf16_prompts": {"quantization": "bf16_weight_only", "bf16_prompts": True},
                   "int8_small": {"quantization": "int8_weight_only"},
                   "int8_prompts": {"quantization": "int8_weight_only", "bf16_prompts": True},
                   # oneDNN's kernel at every step, as on a CPU without AVX-512.
                   "int8_weight_only": {"quantization": "int8_weight_only", "small_linear_rows": 0}}


def greedy_outputs(model_dir: str, dtype: str, quantization: str, prompts: list[list[int]]) -> list[list[int]]:
    settings = ENGINE_SETTINGS.get(quantization, {"quantization": quantization})
    config = EngineConfig(dtype=dtype, kv_cache_bytes=64 * 2**20, **settings)
    with Engine.from_pretrained(model_dir, config) as engine:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        return [c.token_ids for c in engine.generate(prompts, params)]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def measure(model_dir: str, only: set[str] | None = None) -> list[dict]:
    """Every variant's row, or those named in `only` ("dtype:quantization"; fp32's always, first: the reference)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text_ids = tokenizer.encode(TEXT.read_text())
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                              add_generation_prompt=True), add_special_tokens=False)
               for p in HELD_OUT_PROMPTS]
    rows, reference = [], None
    for label, dtype, quantization in VARIANTS:
        if only and rows and f"{dtype}:{quantization}" not in only:
            continue
        logits = text_logits(hf_variant(model, dtype, quantization), text_ids)
        ppl, top1 = perplexity(logits, text_ids), logits.argmax(-1)
        # The dequantized (CUDA) path has no CPU engine to run: the CPU takes the int8-weight kernel.
        outputs = None if quantization in NO_ENGINE else greedy_outputs(model_dir, dtype, quantization, prompts)
        reference = reference or {"ppl": ppl, "top1": top1, "outputs": outputs}
        prefixes = [common_prefix(o, r) / len(r) for o, r in zip(outputs or [], reference["outputs"])] or [None]
        row = {"label": label, "dtype": dtype, "quantization": quantization, "ppl": ppl,
               "ppl_rise": ppl / reference["ppl"] - 1,
               "top1_agreement": (top1 == reference["top1"]).float().mean().item(),
               "accuracy": (top1 == torch.tensor(text_ids[1:])).float().mean().item(),
               "identical": None if outputs is None else sum(o == r for o, r in zip(outputs, reference["outputs"])),
               "mean_prefix": None if outputs is None else sum(prefixes) / len(prefixes),
               "text_tokens": len(text_ids)}
        row["within_bound"] = (row["ppl_rise"] <= QUALITY_BOUND["max_perplexity_rise"]
                               and row["top1_agreement"] >= QUALITY_BOUND["min_top1_agreement"])
        rows.append(row)
        print(f"{label:30s} ppl {ppl:7.3f} ({row['ppl_rise']:+.2%})  top-1 agreement {row['top1_agreement']:.1%}  "
              f"next-token accuracy {row['accuracy']:.1%}  greedy: {_greedy_cells(row)}  "
              f"within bound: {row['within_bound']}", flush=True)
    return rows


def _greedy_cells(row: dict) -> str:
    if row["identical"] is None:
        return "— (no CPU engine path) | —"
    return f"{row['identical']}/{len(HELD_OUT_PROMPTS)} | {row['mean_prefix']:.0%}"


def render(rows: list[dict], command: str) -> str:
    cpu, flags = cpu_info()
    lines = [HEADING, "", f"Command: `{command}`", "",
             f"Machine: {cpu}, torch {torch.__version__}, Python {platform.python_version()}. "
             f"Model: SmolLM2-135M-Instruct (bundled). Perplexity on {TEXT.name} ({rows[0]['text_tokens']} "
             f"tokens, teacher-forced, one window); greedy: {len(HELD_OUT_PROMPTS)} held-out chat prompts, "
             f"{MAX_TOKENS} tokens each, EOS ignored, through the engine, compared with fp32's outputs.", "",
             "| format | perplexity | vs fp32 | top-1 agreement with fp32 | next-token accuracy | "
             "identical greedy outputs | mean share of fp32's greedy output kept before the first difference "
             "| within bound |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['ppl']:.3f} | {r['ppl_rise']:+.2%} | {r['top1_agreement']:.1%} | "
                     f"{r['accuracy']:.1%} | {_greedy_cells(r)} | {'yes' if r['within_bound'] else 'no'} |")
    lines += ["", f"Bound for a default (bench/quality.py QUALITY_BOUND): on the text, perplexity at most "
              f"{QUALITY_BOUND['max_perplexity_rise']:.0%} above fp32 (0.01 nats of cross-entropy per token) and "
              f"fp32's most likely next token kept at {QUALITY_BOUND['min_top1_agreement']:.0%} of positions or "
              "more. Both are teacher-forced, so one changed token does not rewrite the positions after it. "
              "Free-running greedy agreement is shown but is no bound: decoding amplifies any change (one "
              "flipped near-tie rewrites the rest of the output), so identical outputs are not expected even "
              "from a sound format. The model itself predicts the text's next token far less often than 95% "
              "(next-token accuracy), so a format within the bound changes its predictions much less than the "
              "model errs. The engine's start-up check for dtype \"auto\" (inference.formats QUALITY_BOUND: "
              "top-1 agreement >= 0.90 and mean KL <= 0.02 nats against fp32 on 4 fixed prompts) is the cheap "
              "guard run at every start; this table is the fuller check behind it.", "",
              "Caveat for the int4 rows: the bundled model's float weights are themselves dequantized from a "
              "Q4_1 GGUF (4-bit blocks of 32 with a scale and a minimum), which int4 groups of 32 with a scale "
              "and an offset re-express almost exactly (only the bf16 rounding of scale and offset is new). A "
              "model shipped in 16 or 32 bits loses more under int4 than these rows show, so int4 is no "
              "default here even within the bound.", "",
              "The bf16-weights row is the other way round: the same Q4_1 values (a 4-bit code times an fp16 "
              "scale, plus an fp16 minimum) need more bits than bf16's 8 of mantissa, so rounding them loses "
              "something here, whereas the weights of a model shipped in bf16, as most chat models are, round "
              "to themselves and lose nothing."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models-dir", default="var/models")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    parser.add_argument("--only", default="", help="comma-separated dtype:quantization variants (e.g. "
                        "float32:bf16_prompts); fp32 is always measured; implies --no-write")
    args = parser.parse_args()
    torch.manual_seed(0)
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    rows = measure(resolve_model("bundled:smollm2", Path(args.models_dir)), only or None)
    if not args.no_write and not only:
        replace_section(BENCHMARKS, HEADING, render(rows, "python -m bench.quality"))
        print(f"wrote the section to {BENCHMARKS}")


if __name__ == "__main__":
    main()
