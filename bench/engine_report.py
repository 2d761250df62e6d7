"""The markdown of bench.engine's section: one table per comparison, then the
targets, every row with the load average it ran under."""
from __future__ import annotations

from bench import report

TARGETS = {"static": 1.5, "hf1": 8.0, "roofline_pct": 40.0, "chat_tok_s": 60.0, "prefix": 2.0}
PEAK_NAMES = {"float32": "fp32 (the best of torch.mm and the weights packed for MKL or oneDNN)", "bfloat16": "bf16", "float16": "fp16", "int8": "int8 (torch._int_mm)",
              "int8_weight_only": "int8 weights × bf16 (aten._weight_int8pack_mm)",
              "int4_weight_only": "int4 weights × bf16 (aten._weight_int4pack_mm_for_cpu)"}


def _load(result: dict) -> str:
    return f"{result['load_start']:.1f}→{result['load_end']:.1f}" if "load_start" in result else "—"


def _format(row: dict) -> str:
    """The row's label and what it ran as ("auto → bfloat16", "int8 (float32 around int8)",
    "bf16 + CUDA graphs")."""
    return _format_plain(row) + (" + CUDA graphs" if row.get("cuda_graphs") else "")


def _format_plain(row: dict) -> str:
    if row["label"] == "auto":
        weights = "" if row["quantization"] == "none" else f" with {row['quantization']}"
        prompts = ", prompts in bf16" if row.get("bf16_prompts") else ""
        return f"auto → {row['dtype']}{weights}{prompts}"
    if row["quantization"] == "int8_weight_only" and row.get("roofline", {}).get("kernel") == "int8_weight_only":
        return f"{row['label']} (int8 weights × bf16 in the matmuls, {row['dtype']} elsewhere)"
    if row["quantization"] == "int8_weight_only" and row.get("small_linear_rows") == "all":
        return f"{row['label']} (int8 weights × fp32 in small_linear, {row['dtype']} elsewhere)"
    if row["quantization"] == "int4_weight_only" and row.get("roofline", {}).get("kernel") == "int4_weight_only":
        return f"{row['label']} (int4 weights × bf16 in the matmuls, {row['dtype']} elsewhere)"
    if row["quantization"] == "bf16_weight_only":
        return f"{row['label']} (weights rounded to bf16, read as bf16 at one or two rows; fp32 elsewhere)"
    if row["quantization"] != "none":
        return f"{row['label']} ({row['dtype']} activations, {row['quantization']} weights)"
    return row["label"]


def _tok_s(result: dict | None) -> str:
    if not result:
        return "—"
    return f"n/a ({result['error']})" if "error" in result else f"{result['tok_s']:.1f}"


def _ratio(engine: dict, peer: dict | None) -> float | None:
    if not peer or "error" in peer:
        return None
    return engine["tok_s"] / peer["tok_s"]


def _times(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _verdict(value: float | None, target: float, unit: str = "×", digits: int = 2) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}{unit} ({'met' if value >= target else 'missed'})"


def _header(r: dict, heading: str) -> list[str]:
    cfg = r["config"]
    device = f"CUDA ({r['gpu']})" if r["gpu"] else "CPU"
    peaks = ", ".join(f"{PEAK_NAMES.get(k, k)} {v / 1e9:.1f}" for k, v in r["peaks"].items())
    return [heading, "", f"Command: `{r['command'].strip()}`", "",
            f"{report.machine_header(r['machine'])} Device: {device}; {r['threads']} torch threads for every "
            f"contender; load average at the end {r['load_average_end']}; the whole run took "
            f"{r['wall_s'] / 60:.0f} min. Every row below gives the 1-minute load average at its start and end: "
            "about the thread count means the cores were ours, more means other work shared them and slowed "
            "that row.", "",
            f"Model SmolLM2-135M-Instruct. Engine: block size {cfg['block_size']}, max_num_seqs "
            f"{cfg['max_num_seqs']}, max_num_batched_tokens {cfg['max_num_batched_tokens']}, KV cache "
            f"{cfg['kv_cache_bytes'] // 2**20} MiB. "
            f"Peak square-matmul rate measured in each format, GFLOP/s (GOP/s for int8): {peaks}. The HF peers "
            "run in the same format as the engine row they are compared with (int8 on the CPU: torch's dynamic "
            "int8 quantization of every nn.Linear; int8-wo and int4-wo: every nn.Linear on the engine's weight-only "
            "kernel, the lm_head at int8 weight-only under int4-wo as in the engine; bf16 weights: every nn.Linear's "
            "weight rounded to bf16, in fp32). Greedy, EOS ignored, random "
            "prompt ids.", ""]


def _render_equal(r: dict) -> list[str]:
    rows = []
    for row in r["rows"]:
        static, hf1 = row["peers"].get("static"), row["peers"].get("hf1")
        shared = f" (the {row['dtype']} run above)" if row["peers"].get("shared") else ""
        rows.append((_format(row), f"{row['engine']['tok_s']:.1f}", _tok_s(static) + shared,
                     _times(_ratio(row["engine"], static)), _tok_s(hf1) + shared,
                     _times(_ratio(row["engine"], hf1)),
                     " / ".join(_load(x or {}) for x in (row["engine"], static, hf1))))
    hf1_count, sizes = r["sizes"]["hf1"], r["sizes"]
    return [f"### {r['rows'][0]['engine']['requests']} equal-length requests × {sizes['equal_out']} output tokens "
            f"(prompts of {r['equal_prompt_tokens']} tokens), each format", "",
            report.table(["format", "engine tok/s", "HF static batch tok/s", "engine ÷ static",
                          "HF one at a time tok/s", "engine ÷ one at a time", "load 1m: engine / static / one"],
                         rows), "",
            f"HF static batching runs all the requests as one batch (equal lengths: no padding, no wasted step, "
            f"its best case). HF one at a time runs the first {hf1_count} of them; its rate is output tokens per "
            "second. Ratios are within one format; the gain of a format over fp32 is the next table.", ""]


def _render_gains(r: dict) -> list[str]:
    base = next((row for row in r["rows"] if row["label"] == "fp32"), None)
    if base is None:
        return []
    rows = []
    for row in r["rows"]:
        static, base_static = row["peers"].get("static"), base["peers"].get("static")
        static_gain = (_ratio(static, base_static) if static and "error" not in static else None)
        rows.append((_format(row), f"{row['engine']['tok_s']:.1f}", _times(_ratio(row["engine"], base["engine"])),
                     _tok_s(static), _times(static_gain), f"{row['chat']['tok_s']:.1f}",
                     _times(_ratio(row["chat"], base["chat"]))))
    return ["### Format gains: each format against the same contender in fp32", "",
            report.table(["format", "engine equal-length tok/s", "vs engine fp32", "HF static tok/s", "vs HF static fp32",
                          "one chat tok/s", "vs one chat fp32"], rows), ""]


def _render_roofline(r: dict) -> list[str]:
    rows = []
    for row in r["rows"]:
        roof = row["roofline"]
        if not roof.get("decode_steps"):
            rows.append((_format(row), PEAK_NAMES.get(roof["kernel"]), *("—",) * 11))
            continue
        # Results written before the memory ceiling was measured have only the compute figures.
        compute_pct = roof.get("compute_pct", roof["roofline_pct"])
        best_compute_pct = roof.get("best_compute_pct", roof["best_roofline_pct"])
        memory = "bandwidth_gbs" in roof
        rows.append((_format(row), PEAK_NAMES.get(roof["kernel"], roof["kernel"]), f"{roof['peak_gflops']:.1f}",
                     f"{roof['step_ms']:.1f}", f"{roof['best_step_ms']:.1f}",
                     f"{roof['achieved_gflops']:.1f}", f"{compute_pct:.1f}% / {best_compute_pct:.1f}%",
                     f"{roof['step_mb']:.0f}" if memory else "—",
                     f"{roof['compute_ms']:.1f}" if memory else "—",
                     f"{roof['memory_ms']:.1f}" if memory else "—",
                     roof["bound"] if memory else "—",
                     f"{roof['roofline_pct']:.1f}%" if memory else "—",
                     f"{roof['best_roofline_pct']:.1f}%" if memory else "—"))
    bandwidth = r.get("bandwidth")
    measured = (f"{bandwidth / 1e9:.1f} GB/s, the best rate at which the torch threads summed a 1 GiB buffer "
                "(4 GiB on CUDA)" if bandwidth else "not measured in this run")
    return ["### Decode step at 32 running sequences, against the roofline of the format in use", "",
            report.table(["format", "peak measured in", "peak GFLOP/s", "median step ms", "fastest step ms",
                          "achieved GFLOP/s (median)", "% of compute peak (median / fastest)",
                          "MB a step must read", "ms at the peak", "ms at the bandwidth", "bound",
                          "% of roofline (median)", "% of roofline (fastest)"], rows), "",
            "The steps are those of the equal-length run above in which all 32 sequences decode one token each "
            f"(contexts of {r['equal_prompt_tokens']}–{r['equal_prompt_tokens'] + r['sizes']['equal_out']} tokens). "
            "Compute: 2 × matmul parameters (every layer weight and the lm_head) × 32 tokens per step, at the "
            "peak square-matmul rate measured in the format the step's matmuls run in (\"ms at the peak\"). "
            "Memory: the bytes the step must read, every matmul weight as stored (codes and scales when "
            "quantized) and the 32 sequences' K and V at the middle context, at the memory read bandwidth "
            f"({measured}; \"ms at the bandwidth\"). The roofline is the longer of the two; \"bound\" says "
            "which. Bytes that fit in the last-level cache are read faster than that bandwidth: there the memory "
            "time overstates the ceiling, and the roofline share flatters the step.", ""]


def _render_chat(r: dict) -> list[str]:
    rows = [(_format(row), row["chat"]["chats"], row["chat"]["output_tokens"], f"{row['chat']['tok_s']:.1f}",
             f"{row['chat']['ttft_p50'] * 1000:.0f}", _load(row["chat"])) for row in r["rows"]]
    return ["### One chat at a time (engine alone)", "",
            report.table(["format", "chats", "output tokens", "tok/s (wall, TTFT included)", "TTFT p50 ms",
                          "load 1m"], rows), "",
            f"Chat-templated questions, {r['sizes']['chat_tokens']} tokens each, one after another on one engine.",
            ""]


def _render_mixed(r: dict) -> list[str]:
    m = r.get("mixed")
    if not m:
        return []
    e = m["engine"]
    rows = [("engine", e["requests"], e["output_tokens"], f"{e['seconds']:.1f}", f"{e['tok_s']:.1f}", "1.00×",
             _load(e))]
    for key, name in (("static", "HF static batching, padded batches of 16"),
                      ("cb", "transformers continuous batching (generate_batch manager)")):
        peer = m.get(key)
        if peer and "error" not in peer:
            rows.append((name, peer["requests"], peer["output_tokens"], f"{peer['seconds']:.1f}",
                         f"{peer['tok_s']:.1f}", _times(_ratio(e, peer)), _load(peer)))
        elif peer:
            rows.append((name, "—", "—", "—", _tok_s(peer), "—", "—"))
    low, high = r["sizes"]["mixed_out"]
    weights = "" if m.get("quantization", "none") == "none" else f" with {m['quantization']}"
    weights += ", prompts in bf16" if m.get("bf16_prompts") else ""
    return [f"### Mixed lengths in {m['dtype']}{weights} (prompts uniform in [32, 256], outputs in [{low}, {high}])", "",
            report.table(["contender", "requests", "output tokens", "seconds", "output tok/s", "engine ÷ peer",
                          "load 1m"], rows), "",
            "The format is the one \"auto\" chose. The peers run the first N of the engine's requests (their rate "
            "is output tokens per second). HF static batching counts only each request's own tokens although "
            "every batch runs to its longest output; the continuous-batching peer uses each request's own "
            "max_new_tokens with EOS disabled.", ""]


def _render_serving(r: dict) -> list[str]:
    s = r.get("serving")
    if not s:
        return []
    lines = [f"### B: online, Poisson arrivals, streaming ({s['dtype']}; prompts [32, 256], outputs [32, 128])", "",
             report.table(["rate req/s", "requests", "TTFT p50 s", "TTFT p99 s", "ITL p50 ms", "ITL p99 ms",
                           "output tok/s", "load 1m"],
                          [(b["rate"], b["requests"], f"{b['ttft_p50']:.3f}", f"{b['ttft_p99']:.3f}",
                            f"{b['itl_p50'] * 1000:.0f}", f"{b['itl_p99'] * 1000:.0f}", f"{b['tok_s']:.1f}",
                            _load(b)) for b in s["B"]]),
             "", "### C: shared 256-token system prompt + unique question, one request at a time", "",
             report.table(["prefix caching", "requests", "TTFT mean s", "TTFT p50 s", "prefix hit rate"],
                          [(c["prefix_caching"], c["requests"], f"{c['ttft_mean']:.3f}", f"{c['ttft_p50']:.3f}",
                            f"{c['hit_rate']:.2f}") for c in s["C"]])]
    d = s["D"]
    lines += ["", "### D: 20% of streams aborted midway", "",
              report.table(["streams", "aborted", "ended 'abort'", "others exact", "KV blocks used after",
                            "running/waiting after", "output tok/s"],
                           [(d["streams"], d["aborted"], d["aborted_final"], f"{d['others_exact']}/{d['others']}",
                             d["kv_blocks_used_after"], f"{d['running_after']}/{d['waiting_after']}",
                             f"{d['tok_s']:.1f}")]), ""]
    return lines


def _render_targets(r: dict) -> list[str]:
    rows = r["rows"]
    shape = f"{rows[0]['engine']['requests']} × {r['sizes']['equal_out']}"
    lines = [report.table(
        ["target", *(_format(row) for row in rows)],
        [(f"{shape}: engine ÷ HF static batching, same format, ≥ 1.5×",
          *(_verdict(_ratio(row["engine"], row["peers"].get("static")), TARGETS["static"]) for row in rows)),
         (f"{shape}: engine ÷ HF one at a time, same format, ≥ 8×",
          *(_verdict(_ratio(row["engine"], row["peers"].get("hf1")), TARGETS["hf1"]) for row in rows)),
         ("decode at 32 sequences ≥ 40% of the format's compute peak (median step)",
          *(_verdict(row["roofline"].get("compute_pct", row["roofline"].get("roofline_pct")),
                     TARGETS["roofline_pct"], "%", 1) for row in rows)),
         ("decode at 32 sequences ≥ 40% of the format's roofline, compute or memory (median step)",
          *(_verdict(row["roofline"].get("roofline_pct") if "bandwidth_gbs" in row["roofline"] else None,
                     TARGETS["roofline_pct"], "%", 1) for row in rows)),
         ("one chat at a time ≥ 60 tok/s (engine alone)",
          *(_verdict(row["chat"]["tok_s"], TARGETS["chat_tok_s"], " tok/s", 1) for row in rows))])]
    serving = r.get("serving")
    if serving:
        off, on = serving["C"]
        ratio = off["ttft_mean"] / on["ttft_mean"]
        lines += ["", f"- C: prefix caching cuts mean TTFT {ratio:.2f}× "
                      f"(target ≥ 2×: {'met' if ratio >= TARGETS['prefix'] else 'missed'})"]
    return ["### Targets", ""] + lines + [""]


def render(r: dict, heading: str) -> str:
    lines = (_header(r, heading) + _render_equal(r) + _render_gains(r) + _render_roofline(r) + _render_chat(r)
             + _render_mixed(r) + _render_serving(r) + _render_targets(r))
    return "\n".join(lines)
