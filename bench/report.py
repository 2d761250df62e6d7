"""What every benchmark reports the same way: the machine, markdown tables, and
its own section of docs/BENCHMARKS.md.

No torch import here: the gateway and start-up benchmarks never load it, and
the package versions come from their installed metadata.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "docs" / "BENCHMARKS.md"

# The CPU flags that decide how fast torch's CPU kernels run (vector width,
# FMA, bf16/fp16 and AMX support); /proc/cpuinfo lists a hundred others.
_SIMD_FLAG_PREFIXES = ("sse4", "avx", "fma", "f16c", "amx")


def _cpuinfo() -> tuple[str, list[str]]:
    """The CPU model name and its SIMD flags, from the first processor entry."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = [f for f in value.split() if f.startswith(_SIMD_FLAG_PREFIXES)]
                if not line.strip() and flags:
                    break  # the end of the first processor's entry
    except OSError:
        pass
    return model, flags


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict:
    model, flags = _cpuinfo()
    return {
        "cpu": model, "cpu_flags": flags, "cores": os.cpu_count(),
        "torch": _version("torch"), "transformers": _version("transformers"),
        "python": platform.python_version(), "os": platform.platform(),
        "load_average": tuple(round(x, 2) for x in os.getloadavg()),
    }


def machine_header(info: dict | None = None) -> str:
    """One markdown paragraph naming the machine: every section starts with it,
    as figures from this shared box mean little without the load beside them."""
    m = info or machine_info()
    return (f"Machine: {m['cpu']} ({' '.join(m['cpu_flags']) or 'no SIMD flags listed'}), {m['cores']} cores, "
            f"torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}, {m['os']}; "
            f"load average {m['load_average']} at the start.")


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that produced a section, as a reader would retype it."""
    args = argv if argv is not None else sys.argv[1:]
    # shlex quotes what the shell would lose: `--out ''` stays retypable.
    return " ".join(["python -m", module, shlex.join(args)]).rstrip()


def provenance(module: str, argv: list[str] | None, machine: dict) -> str:
    """The start of a section: its command, when it ran, and on what."""
    return (f"`{command_line(module, argv)}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
            f"{machine_header(machine)}")


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(headers: list[str], rows: list[tuple]) -> str:
    """A markdown table; cells are written with str()."""
    return "\n".join([row(*headers), "|" + "---|" * len(headers)] + [row(*r) for r in rows])


def write_section(section: str, heading: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace one benchmark's section (by its `## ` heading), keeping whatever
    other sections the file has; every benchmark writes through this."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    start = text.find(heading)
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section.rstrip("\n") + "\n" + (text[end:] if end != -1 else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 1]; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]
