#!/usr/bin/env bash
# The GPU checks, as one short run on a lent machine that has torch/transformers/peft/accelerate but
# no weights, no tether and no network (docs/benchmarks.md, "GPU checks"). Prepare here, once:
#   bench/device_check.sh --prepare     # .whl/ (pydantic for Python 3.12) and .dev/home (pack, task, tokenizer)
# then run it there with both folders carried; results land in $OUT (default /tmp/tether-device; copy
# them to the tool's $OUT: `DEADLINE=545 bash bench/device_check.sh; cp -r /tmp/tether-device/. "$OUT"/`,
# timeout_s 575; a full run took 388 s of its 575 on an H200):
#   1. the CUDA tests (tests/test_gpu.py) and the rest of the fast suite with the GPU visible
#   2. bench/step_overhead.py at Qwen2-0.5B's shapes in bf16 (plain Trainer + PEFT vs each method), at
#      batch 8 and 32, and a torch.profiler run of the replace vs add replay modes (`--profile`)
#   3. one `tether train` of the default recipe (guard on) on a random Qwen2-0.5B, bf16, scored on
#      `general-quick` (on the full suite a 150 s cap cut the final scoring: a random model generates
#      to every probe's token limit)
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--prepare" ]]; then
  py=${PYTHON:-.venv/bin/python}
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "pydantic==$("$py" -c 'import pydantic; print(pydantic.VERSION)')" \
    "pydantic_core==$("$py" -c 'import pydantic_core; print(pydantic_core.__version__)')" \
    annotated-types typing-inspection typing_extensions
  home=$("$py" -c 'from tether.io import tether_home; print(tether_home())')
  "$py" -c 'from tether.data.builtin.pack import ensure_pack; from tether.data.builtin.tasks import ensure_task; from tether.models import load_tokenizer; ensure_pack("general-v2"); ensure_task("fortune-topics"); load_tokenizer("smollm2-135m-instruct")'
  mkdir -p .dev/home/models/smollm2-135m-instruct
  cp -r "$home/data" .dev/home/
  (cd "$home/models/smollm2-135m-instruct" && cp config.json generation_config.json tokenizer.json \
     tokenizer_config.json chat_template.jinja "$OLDPWD/.dev/home/models/smollm2-135m-instruct/")
  echo "prepared .whl and .dev/home; carry both: run(command='bash bench/device_check.sh', carry=['.whl', '.dev'])"
  exit 0
fi

OUT=${OUT:-/tmp/tether-device}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" TETHER_HOME="$PWD/.dev/home" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c 'import torch, transformers, peft, accelerate; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__)' | tee -a "$OUT/gpu.txt"

# the embedded model travels without its weights: random weights in its shapes let the tokenizer
# fixtures resolve it (no test run here reads the weights: the `slow` ones are deselected)
python3 - <<'EOF'
import os, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
d = Path(os.environ["TETHER_HOME"], "models", "smollm2-135m-instruct")
if not (d / "model.safetensors").exists():
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d)).save_pretrained(d)
# a random Qwen2-0.5B with SmolLM2's tokenizer, for the end-to-end run
import sys; sys.path.insert(0, "bench")
from step_overhead import RANDOM_CONFIGS
from tether.models import load_tokenizer
torch.manual_seed(0)
cfg = AutoConfig.for_model(**RANDOM_CONFIGS["qwen2-0.5b"])
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
tok = load_tokenizer(d)
m.generation_config.eos_token_id = tok.eos_token_id
m.save_pretrained("/tmp/qwen2-0.5b-random")
tok.save_pretrained("/tmp/qwen2-0.5b-random")
print("random models ready")
EOF

echo "== 1. the CUDA tests ($SECONDS s)"
timeout 120 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15

echo "== 2. step-time overhead, Qwen2-0.5B shapes, bf16 ($SECONDS s)"
timeout 180 python3 bench/step_overhead.py --random-config qwen2-0.5b --bf16 --steps 15 --warmup 4 \
  --only "tether LoRA" "+ replay 20%" "+ freeze 50%" "+ EWC" "+ LwF" "+ replay 25% + LwF on replay rows" \
  "+ replay 25% + LwF on a general batch" "+ replay 25% + LwF on inputs" \
  --out "$OUT/step_overhead_gpu.json" 2>&1 | grep -v "it/s\]" | tail -20

# shared prompt prefixes: the same configurations with training.share_prefix off; and the default with
# LwF's teacher running every block instead of from the first trained one
timeout 150 python3 bench/step_overhead.py --random-config qwen2-0.5b --bf16 --steps 10 --warmup 3 \
  --only "tether LoRA, dropout 0" "tether LoRA, dropout 0, prefix sharing off" "default recipe's methods" \
  "default recipe's methods, prefix sharing off" "default recipe's methods, teacher runs every block" \
  --out "$OUT/step_overhead_gpu_prefix.json" 2>&1 | grep -v "it/s\]" | tail -10

# batch 32: how much of batch 8's per-step launch overhead is amortised
timeout 120 python3 bench/step_overhead.py --random-config qwen2-0.5b --bf16 --steps 10 --warmup 3 --batch-size 32 \
  --only "tether LoRA" "+ EWC" "+ LwF" "+ replay 25% + LwF on replay rows, LoRA dropout 0" \
  --out "$OUT/step_overhead_gpu_b32.json" 2>&1 | grep -v "it/s\]" | tail -12

# why did replay mode add cost 1.4-2.0x the replace mode's step on an H200 for 1.25x the rows? the default
# (mode add + the bottom half frozen) against mode replace with nothing frozen, and the distil-inputs recipe
# (mode add + LwF on inputs + answer tokens)
timeout 150 python3 bench/step_overhead.py --random-config qwen2-0.5b --bf16 --steps 5 --warmup 3 --profile \
  --only "+ replay 25% + LwF on replay rows, LoRA dropout 0" \
  "+ replay 20% on top (mode add) + LwF on replay rows, LoRA dropout 0" \
  "default recipe's methods" \
  "default recipe's methods, replay mode replace, nothing frozen, random A, LwF on replay rows" \
  "distil-inputs recipe's methods" \
  --out "$OUT/step_profile_gpu.json" 2>&1 | grep -v "it/s\]" | tail -8

echo "== 3. tether train, default recipe, random Qwen2-0.5B, bf16, guard every 20 steps"
start=$SECONDS
task="$TETHER_HOME/data/tasks/fortune-topics"
timeout 120 python3 -c 'import sys; from tether.cli import main; sys.argv[0] = "tether"; main()' train \
  --task "$task/train.jsonl" --eval "$task/eval.jsonl" --model /tmp/qwen2-0.5b-random -o /tmp/run-gpu \
  --set training.bf16=true --set guard.action=warn --set general=general-quick --set task.eval_limit=80 2>&1 | grep -v "it/s\]" | tail -30
echo "tether train: $((SECONDS - start)) s"
cp /tmp/run-gpu/summary.json "$OUT/train_summary.json" 2>/dev/null
cp /tmp/run-gpu/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null

# not there: the source downloads pack builds start from, and `datasets` (one reader test)
echo "== 4. the rest of the fast suite with the GPU visible"
start=$SECONDS
timeout "$(( ${DEADLINE:-530} - SECONDS > 30 ? ${DEADLINE:-530} - SECONDS : 30 ))" python3 -m pytest -q -m "not slow" -p no:cacheprovider -o addopts="" \
  --ignore=tests/test_gpu.py --ignore=tests/test_pack.py -k "not test_datasets_object_and_list" tests 2>&1 | tee "$OUT/pytest.log" | tail -25
echo "tests: $((SECONDS - start)) s"
