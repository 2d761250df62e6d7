"""Markdown for the benchmark: tables, targets, and the engine section of docs/BENCHMARKS.md."""
from __future__ import annotations

from pathlib import Path

HEADING = "## Engine (inference.bench)"


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _verdict(value: float, target: float) -> str:
    return f"{value:.2f}× (target ≥ {target}×: {'met' if value >= target else 'missed'})"


def render(r: dict) -> str:
    m, cfg = r["machine"], r["config"]
    lines = [HEADING, "",
             f"Command: `{r['command'].strip()}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['torch_threads']} threads, "
             f"transformers {m['transformers']}, Python {m['python']}, {m['os']}. "
             f"Load average at start {tuple(round(x, 2) for x in m['load_average'])}, "
             f"at end {tuple(round(x, 2) for x in m['load_average_end'])} (other work shared the box).", "",
             f"Model SmolLM2-135M-Instruct, fp32 on CPU for every contender. Engine: block size {cfg.block_size}, "
             f"max_num_seqs {cfg.max_num_seqs}, max_num_batched_tokens {cfg.max_num_batched_tokens}, "
             f"KV cache {cfg.kv_cache_bytes // 2**20} MiB. Measured peak matmul rate: "
             f"{r['peak_flops'] / 1e9:.1f} GFLOP/s (best fp32 square matmul).", ""]
    a = r["A_engine"]
    lines += ["### A: offline throughput (prompt and output lengths uniform in [32, 256], EOS ignored)", "",
              _row("contender", "requests", "output tokens", "seconds", "output tok/s", "engine speed-up", "load 1m after"),
              _row(*["---"] * 7),
              _row("engine (this)", a["requests"], a["output_tokens"], f"{a['seconds']:.1f}", f"{a['tok_s']:.1f}", "1.00×",
                   f"{a['load_1m']:.1f}")]
    targets = {"A_hf1": ("HF generate, one request at a time", 8), "A_static": ("HF static batching, padded batches of 16", 1.3),
               "A_cb": ("transformers continuous batching (generate_batch manager)", 3)}
    verdicts = []
    for key, (name, target) in targets.items():
        if key in r:
            peer = r[key]
            speedup = a["tok_s"] / peer["tok_s"]
            lines.append(_row(name, peer["requests"], peer["output_tokens"], f"{peer['seconds']:.1f}",
                              f"{peer['tok_s']:.1f}", f"{speedup:.2f}×", f"{peer['load_1m']:.1f}"))
            verdicts.append(f"- A vs {name}: {_verdict(speedup, target)}")
    lines += ["", "The slow peers run a subset of the same requests (the first N of A; their rate is output "
              "tokens per second, which extrapolates per token, not per request). HF static batching counts only "
              "each request's own tokens although every batch runs to its longest output. The continuous-batching "
              "peer uses each request's own max_new_tokens with EOS disabled. `load 1m after` is the 1-minute load "
              "average when the run ended: about the thread count means the box was ours; more means other "
              "processes shared the two cores and the row is slowed by them.", ""]
    lines += ["### B: online, Poisson arrivals, streaming (prompts [32, 256], outputs [32, 128])", "",
              _row("rate req/s", "requests", "TTFT p50 s", "TTFT p99 s", "ITL p50 ms", "ITL p99 ms", "output tok/s"),
              _row(*["---"] * 7)]
    for b in r["B"]:
        lines.append(_row(b["rate"], b["requests"], f"{b['ttft_p50']:.3f}", f"{b['ttft_p99']:.3f}",
                          f"{b['itl_p50'] * 1000:.0f}", f"{b['itl_p99'] * 1000:.0f}", f"{b['tok_s']:.1f}"))
    off, on = r["C"]
    ratio = off["ttft_mean"] / on["ttft_mean"]
    lines += ["", "### C: shared 256-token system prompt + unique question, one request at a time", "",
              _row("prefix caching", "requests", "TTFT mean s", "TTFT p50 s", "prefix hit rate"), _row(*["---"] * 5)]
    for c in r["C"]:
        lines.append(_row(c["prefix_caching"], c["requests"], f"{c['ttft_mean']:.3f}", f"{c['ttft_p50']:.3f}",
                          f"{c['hit_rate']:.2f}"))
    verdicts.append(f"- C: prefix caching cuts mean TTFT {ratio:.2f}× (target ≥ 2×: {'met' if ratio >= 2 else 'missed'})")
    d = r["D"]
    lines += ["", "### D: 20% of streams aborted midway", "",
              _row("streams", "aborted", "ended 'abort'", "others exact", "KV blocks used after", "running/waiting after", "output tok/s"),
              _row(*["---"] * 7),
              _row(d["streams"], d["aborted"], d["aborted_final"], f"{d['others_exact']}/{d['others']}",
                   d["kv_blocks_used_after"], f"{d['running_after']}/{d['waiting_after']}", f"{d['tok_s']:.1f}")]
    roof = r["roofline"]
    lines += ["", "### Decode step at 32 concurrent sequences (prompts of 128 tokens)", "",
              _row("decode steps", "median step ms", "fastest step ms", "achieved GFLOP/s (median)", "peak GFLOP/s",
                   "% of roofline (median)", "% of roofline (fastest)", "load 1m after"),
              _row(*["---"] * 8),
              _row(roof["decode_steps"], f"{roof['step_ms']:.1f}", f"{roof['best_step_ms']:.1f}",
                   f"{roof['achieved_gflops']:.1f}", f"{roof['peak_gflops']:.1f}", f"{roof['roofline_pct']:.1f}%",
                   f"{roof['best_roofline_pct']:.1f}%", f"{roof['load_1m']:.1f}"),
              "", "Roofline: 2 × matmul parameters (every layer weight and the lm_head) × 32 tokens per step, "
              "over the measured peak matmul rate.", ""]
    verdicts.append(f"- Decode at 32 sequences: {roof['roofline_pct']:.1f}% of roofline "
                    f"(target ≥ 40%: {'met' if roof['roofline_pct'] >= 40 else 'missed'})")
    lines += ["### Targets", ""] + verdicts + ["",
              "Where a decode step's time goes (torch profiler, 32 sequences, ~160-token contexts, on this box): "
              "about 55% in the weight GEMMs (at 32 rows a GEMM runs at roughly 60-70% of the square-matmul "
              "peak; the 49152-row lm_head is memory-bound), about 35% in attention, of which gathering each "
              "sequence's KV blocks is half, and the rest in norms, rotary and Python. That caps this design near "
              "30-35% of the square-matmul roofline at 32 sequences; 64 sequences (workload A) amortise the weights "
              "better. transformers' continuous batching is a real batching engine, so the gap to it is what "
              "paged decode batching, chunked prefill and no per-step cache copies buy on a CPU, not a "
              "batch-of-one handicap.", ""]
    return "\n".join(lines)


def write_section(path: Path, section: str, heading: str = HEADING) -> None:
    """Replace one benchmark's section (by its `## ` heading), keeping whatever
    other sections the file has; every benchmark script writes through this."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    start = text.find(heading)
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section.rstrip("\n") + "\n" + (text[end:] if end != -1 else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n")
