#!/usr/bin/env bash
# The engine's checks on a CUDA GPU, as one prepared call for a session that is
# lent a GPU machine (CI never has one; its device time is 15 minutes a session).
#
#   here, once:      bash bench/device_check.sh --prepare
#                    (copies the bundled SmolLM2's config and tokenizer, 3.5 MB, into var/device/smollm2;
#                    its weights, 540 MB, are over what may travel to the device machine)
#   on the device:   the device tool's run, command "bash bench/device_check.sh", carry ["var/device"],
#                    timeout_s 540; the files come back from $OUT
#
# On the device machine python3 holds torch with CUDA, transformers and pytest,
# and nothing of this project's other packages; the engine core, its tests and
# bench.engine import none of them. What it runs, each step time-boxed so that
# a hang still leaves the others' files:
#   1. tests/inference/test_engine_cuda.py on the GPU: fp32 gives HF generate's tokens (batched, preempted,
#      chunked prefill), each reduced format gives the same tokens batched as alone, CUDA graphs give the eager
#      steps' tokens, and Stop frees a slot within one step;
#   2. bench.engine on SmolLM2's shapes with random weights (its speed is the real model's; its text is noise),
#      every CUDA format with and without CUDA graphs, against the HF peers in the same format.
# Then record the figures in docs/BENCHMARKS.md with the GPU's name, and say the weights were random.
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL_FILES="config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja"

if [ "${1:-}" = "--prepare" ]; then
    python=${PYTHON:-.venv/bin/python}
    source_dir=$("$python" -c "from bench.engine import bundled_model_dir; print(bundled_model_dir())") || exit
    mkdir -p var/device/smollm2
    for name in $MODEL_FILES; do
        [ -f "$source_dir/$name" ] && cp "$source_dir/$name" var/device/smollm2/
    done
    du -sh var/device
    exit 0
fi

python=${PYTHON:-python3}
out=${OUT:-var/device/out}
device=${DEVICE:-cuda}
mkdir -p "$out"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1

{ date -u; nvidia-smi -L 2>&1; "$python" -c "import torch, transformers; print('torch', torch.__version__,
'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0), '| transformers',
transformers.__version__)"; } > "$out/env.txt" 2>&1
cat "$out/env.txt"

echo "== 1. the engine's guarantees on $device"
# -c /dev/null and --confcutdir: none of the Django suite's configuration (pytest-django, tests.env, the
# embedded services) is loaded, only the engine fixtures of tests/inference.
ENGINE_TEST_DEVICE=$device timeout 240 "$python" -m pytest tests/inference/test_engine_cuda.py -c /dev/null \
    --rootdir . --confcutdir tests/inference -p no:cacheprovider -q -ra --timeout 200 2>&1 | tee "$out/tests.log"

echo "== 2. bench.engine on $device, SmolLM2's shapes with random weights"
model=/tmp/smollm2-random
"$python" - "$model" <<'EOF' || exit
import shutil, sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

source, target = Path("var/device/smollm2"), Path(sys.argv[1])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
model.save_pretrained(target)
for path in source.iterdir():
    if path.name != "config.json":
        shutil.copy(path, target / path.name)
print("random-weight model in", target)
EOF
# "auto" is bf16 on CUDA, and the format the mixed-length and serving rows run in.
formats=fp32,int8-wo,auto
[ "$device" = cuda ] && graphs=--cuda-graphs || graphs=
# BENCH_ENGINE_ARGS: e.g. "--quick --skip-serving" for a smoke run of this script on the CPU.
timeout 300 "$python" -m bench.engine --model "$model" --device "$device" --formats "$formats" $graphs \
    ${BENCH_ENGINE_ARGS:-} --out "$out/engine.md" --json "$out/engine.json" 2>&1 | tee "$out/engine.log"
