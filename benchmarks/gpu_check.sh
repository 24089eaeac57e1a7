#!/usr/bin/env bash
# The GPU check: on a fresh CUDA machine, from the repository root (or anywhere: it cds there),
#
#     bash benchmarks/gpu_check.sh                 # build the CUDA extension, run the device tests, every benchmark
#     bash benchmarks/gpu_check.sh --cpu-dry-run   # the same steps' CPU paths on tiny shapes (also when no GPU is seen)
#
# options: --budget SECONDS (total, default 450: under 8 minutes with the step overheads), --skip a,b,c (step
# names), --only a,b (run just these), --python PY, --smoke (with the dry run: the fastest subset, for
# tests/test_gpu_check.py: no build, torchrun or compile steps, fewer cases in the others). Environment: PYTHON,
# OUT (the JSON goes to $OUT/gpu_check.json, else runs/gpu_check.json; the step logs beside it in gpu_check_logs/),
# GPU_CHECK_FORCE_FAIL=a,b (for tests: these steps exit 1 instead of running their command).
# Exit status: 0 when every step that ran passed; 1 when any failed or timed out (the JSON is written first);
# 2 on a usage error or when the JSON could not be written. Steps skipped by option or budget do not fail it.
#
# Steps, in priority order (each under its own `timeout`, cut to what is left of the budget; a step that does
# not fit is recorded as skipped; a failing step never stops the next one):
#   env           python, torch, CUDA, GPU, triton versions
#   build         the extension in place: CUDA (DUPFAST_REQUIRE_CUDA=1, TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16);
#                 the dry run builds the CPU extension (DUPFAST_FORCE_CPU=1)
#                 (if that fails: build_cpu_fallback, the CPU extension, so the Triton and CPU paths still run)
#   ext_check     which ops have a compiled kernel for the device (cuda: all four must: mahalanobis,
#                 layer_transitions, kl_div_fused, linear_kl_div_fused)
#   ops_device    tests/ops/test_ops_device.py: cuda + triton backends on CUDA tensors vs the reference and the
#                 fp64 oracle, every shape plus the benchmark shapes (mahalanobis, layer_transitions, kl_div,
#                 linear_kl_div incl. SmolLM2's head R=4096 H=576 V=49152), and detect on the GPU vs the CPU
#                 (DUPFAST_TEST_GPU=1: no Triton interpreter); dry run: DUPFAST_OPS_DEVICES=cpu, small shapes
#   bench_kernels benchmarks/bench_{mahalanobis,transitions,kl,linear_kl}.py with DUPFAST_BENCH_DEVICE=cuda
#   bench_detect  benchmarks/bench_detect.py (synthetic MiniLM-shaped model when none is installed)
#   bench_scale   benchmarks/bench_detect_scale.py (peak RSS / CUDA memory over 1e3..1e5 pool inputs)
#   torchrun      tests/test_detect_torchrun.py (2 gloo CPU ranks == 1 process)
#   ops_compile   tests/ops/test_nvcc_compile.py + test_triton_aot.py (compile-only checks CI also runs)
# The JSON: per step rc (124 = timed out), seconds, test counts (passed/failed/errors/skipped) from junit XML,
# and the benchmarks' ratios (every extra_info key naming a ratio, speedup, fraction, percentage, relative
# difference or error, or an "a_over_b").
set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)

DRY=0
SMOKE=0
BUDGET=450
SKIP=","
ONLY=""
PY=${PYTHON:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) DRY=1 ;;
    --budget) BUDGET=$2; shift ;;
    --skip) SKIP=",$2,"; shift ;;
    --only) ONLY=",$2,"; shift ;;
    --python) PY=$2; shift ;;
    --smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$PY" ]; then
  if command -v python >/dev/null 2>&1; then PY=python; else PY=python3; fi
fi

if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  echo "gpu_check: torch sees no GPU: running the CPU dry run" >&2
  DRY=1
fi

OUTDIR=${OUT:-$ROOT/runs}
mkdir -p "$OUTDIR"
JSON=$OUTDIR/gpu_check.json
LOGS=$OUTDIR/gpu_check_logs
rm -rf "$LOGS"
mkdir -p "$LOGS"
STEPS=$LOGS/steps.jsonl
: > "$STEPS"
START=$(date +%s)
RESERVE=15  # seconds kept for writing the JSON

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY" = 1 ]; then
  MODE=cpu-dry-run
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DUPFAST_BENCH_TINY=1 DUPFAST_BENCH_ROUNDS=1
  BENCH_OPTS=(--benchmark-only --benchmark-min-rounds=1 --benchmark-max-time=0.01 --benchmark-warmup=off)
else
  MODE=cuda
  export DUPFAST_BENCH_DEVICE=cuda
  BENCH_OPTS=(--benchmark-only --benchmark-min-rounds=3 --benchmark-max-time=0.5)
fi
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts=-ra)
OPS_K=()
DETECT_K=()
SCALE_MODES=default,dup
if [ "$SMOKE" = 1 ]; then
  [ "$DRY" = 1 ] || { echo "gpu_check: --smoke goes with --cpu-dry-run" >&2; exit 2; }
  SKIP="${SKIP}build,torchrun,ops_compile,"
  OPS_K=(-k "fp32 and not detect_on_device")
  DETECT_K=(-k "bare_forward or detect_one_pass and dup")
  SCALE_MODES=default
  MODE=cpu-dry-run-smoke
fi

wanted() {  # step name -> 0 if it should run
  case "$SKIP" in *",$1,"*) return 1 ;; esac
  if [ -n "$ONLY" ]; then case "$ONLY" in *",$1,"*) return 0 ;; *) return 1 ;; esac; fi
  return 0
}

record() {  # name rc seconds timeout kind note
  printf '{"name": "%s", "rc": %s, "seconds": %s, "timeout": %s, "kind": "%s", "note": "%s"}\n' \
    "$1" "$2" "$3" "$4" "$5" "$6" >> "$STEPS"
}

step() {  # name timeout kind(plain|pytest|bench) command...
  local name=$1 limit=$2 kind=$3
  shift 3
  if ! wanted "$name"; then
    record "$name" null 0 0 "$kind" "skipped by option"
    return
  fi
  local now left
  now=$(date +%s)
  left=$(( BUDGET - (now - START) - RESERVE ))
  if [ "$left" -lt 10 ]; then
    record "$name" null 0 0 "$kind" "skipped: total budget of ${BUDGET} s spent"
    echo "== $name: skipped (budget)"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  case ",${GPU_CHECK_FORCE_FAIL:-}," in
    *",$name,"*) set -- sh -c 'echo "gpu_check: failing this step on purpose (GPU_CHECK_FORCE_FAIL)"; exit 1' ;;
  esac
  local extra=()
  case "$kind" in
    pytest) extra=(--junitxml="$LOGS/$name.xml") ;;
    bench) extra=(--junitxml="$LOGS/$name.xml" --benchmark-json="$LOGS/$name.bench.json") ;;
  esac
  echo "== $name (timeout ${limit} s): $*"
  local t0 t1 rc
  t0=$(date +%s.%N)
  timeout -k 10 "$limit" "$@" "${extra[@]}" > "$LOGS/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  local secs
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  record "$name" "$rc" "$secs" "$limit" "$kind" ""
  echo "   rc $rc, $secs s (log: $LOGS/$name.log)"
  tail -n 3 "$LOGS/$name.log" | sed 's/^/   | /'
}

# ---- the steps ------------------------------------------------------------------------------------

step env 60 plain "$PY" - <<'EOF'
import json, os, platform, shutil, subprocess
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count(), "nvcc": shutil.which("nvcc")}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1))
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
if shutil.which("nvidia-smi"):
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
print("ENV " + json.dumps(info))
EOF

if [ "$DRY" = 1 ]; then
  step build 300 plain env DUPFAST_FORCE_CPU=1 MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py build_ext --inplace
else
  step build 300 plain env DUPFAST_REQUIRE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 "$PY" setup.py build_ext --inplace
  if ! grep -q '"name": "build", "rc": 0,' "$STEPS"; then
    # no CUDA extension: the CPU one, so the Triton kernels and the rest still run (cuda cases then fail)
    step build_cpu_fallback 200 plain env DUPFAST_FORCE_CPU=1 MAX_JOBS=16 "$PY" setup.py build_ext --inplace
  fi
fi

step ext_check 60 plain env GPU_CHECK_DRY=$DRY "$PY" - <<'EOF'
import json, os, sys
import dupfast
from dupfast import _ext
ops = ("mahalanobis", "layer_transitions", "kl_div_fused", "linear_kl_div_fused")
info = {"dupfast": dupfast.__file__, "load_error": str(_ext.load_error()) if _ext.load_error() else None,
        "cpu_ops": {o: _ext.has_op(o) for o in ops}, "cuda_ops": {o: _ext.has_cuda_op(o) for o in ops}}
print("EXT " + json.dumps(info))
need = info["cpu_ops"] if os.environ["GPU_CHECK_DRY"] == "1" else info["cuda_ops"]
sys.exit(0 if all(need.values()) else 1)
EOF

if [ "$DRY" = 1 ]; then
  step ops_device 200 pytest env DUPFAST_OPS_DEVICES=cpu "${PYTEST[@]}" tests/ops/test_ops_device.py "${OPS_K[@]}"
else
  step ops_device 200 pytest env DUPFAST_TEST_GPU=1 "${PYTEST[@]}" tests/ops/test_ops_device.py
fi
step bench_kernels 210 bench "${PYTEST[@]}" -s benchmarks/bench_mahalanobis.py benchmarks/bench_transitions.py \
  benchmarks/bench_kl.py benchmarks/bench_linear_kl.py "${BENCH_OPTS[@]}"
step bench_detect 120 bench env DUPFAST_BENCH_DETECT_OUT="$LOGS/bench_detect.json" "${PYTEST[@]}" -s \
  benchmarks/bench_detect.py "${BENCH_OPTS[@]}" "${DETECT_K[@]}"
if [ "$DRY" = 1 ]; then SCALE_NS=200,400; else SCALE_NS=1000,10000,100000; fi
step bench_scale 150 bench env DUPFAST_SCALE_NS=$SCALE_NS DUPFAST_SCALE_MODES=$SCALE_MODES DUPFAST_BENCH_OUT="$LOGS/bench_detect_scale.json" \
  "${PYTEST[@]}" -s benchmarks/bench_detect_scale.py "${BENCH_OPTS[@]}"
step torchrun 120 pytest "${PYTEST[@]}" tests/test_detect_torchrun.py
step ops_compile 150 pytest "${PYTEST[@]}" tests/ops/test_nvcc_compile.py tests/ops/test_triton_aot.py

# ---- the one JSON ---------------------------------------------------------------------------------
"$PY" - "$STEPS" "$LOGS" "$JSON" "$MODE" "$BUDGET" "$START" <<'EOF'
import glob, json, os, re, sys, time
import xml.etree.ElementTree as ET

steps_file, logs, out, mode, budget, start = sys.argv[1:7]
RATIO = re.compile(r"ratio|speedup|fraction|pct_|rel_diff|rel_err|abs_diff|_over_|slope|us_per_input")


def junit(path):
    if not os.path.exists(path):
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    c = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return {"passed": c["tests"] - c["failures"] - c["errors"] - c["skipped"], "failed": c["failures"],
            "errors": c["errors"], "skipped": c["skipped"]}


def numbers(d):
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and RATIO.search(k)}


def benches(path):
    if not os.path.exists(path):
        return None
    data = json.load(open(path))
    out = {}
    for b in data.get("benchmarks", []):
        entry = {"min_s": b["stats"]["min"], "median_s": b["stats"]["median"]}
        entry.update(numbers(b.get("extra_info", {})))
        for k in ("peak_extra_mib", "peak_extra_mib_dupfast", "peak_extra_mib_torch", "memory_ratio",
                  "memory_fraction_of_reference"):
            if k in b.get("extra_info", {}):
                entry[k] = b["extra_info"][k]
        out[b["name"]] = entry
    return out


def tail(path, n=25):
    try:
        return open(path, errors="replace").read().splitlines()[-n:]
    except OSError:
        return []


def tagged(path, tag):
    for line in reversed(tail(path, 400)):
        if line.startswith(tag + " "):
            try:
                return json.loads(line[len(tag) + 1:])
            except ValueError:
                return None
    return None


steps = [json.loads(line) for line in open(steps_file) if line.strip()]
report = {"mode": mode, "budget_s": float(budget), "total_s": round(time.time() - float(start), 1),
          "time": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": {}}
for s in steps:
    name = s.pop("name")
    log = os.path.join(logs, name + ".log")
    if s["rc"] is not None:
        s["ok"] = s["rc"] == 0
        s["timed_out"] = s["rc"] in (124, 137)
        s["tests"] = junit(os.path.join(logs, name + ".xml"))
        b = benches(os.path.join(logs, name + ".bench.json"))
        if b is not None:
            s["benchmarks"] = b
        if s["rc"] != 0:
            s["log_tail"] = tail(log)
    else:
        s["ok"] = None
    if not s["note"]:
        del s["note"]
    report["steps"][name] = s
env = tagged(os.path.join(logs, "env.log"), "ENV")
if env:
    report["env"] = env
ext = tagged(os.path.join(logs, "ext_check.log"), "EXT")
if ext:
    report["steps"]["ext_check"]["ext"] = ext
for name, fname in (("bench_detect", "bench_detect.json"), ("bench_scale", "bench_detect_scale.json")):
    p = os.path.join(logs, fname)
    if os.path.exists(p) and name in report["steps"]:
        data = json.load(open(p))
        keep = ("model", "samples", "device", "fallback")  # fallback: bench_detect timed a stand-in model/data
        report["steps"][name]["results"] = data.get("summary", numbers(data) | {k: data[k] for k in keep if k in data})
        if "points" in data:
            report["steps"][name]["points"] = data["points"]
ran = [s for s in report["steps"].values() if s["rc"] is not None]
report["summary"] = {"steps_run": len(ran), "steps_ok": sum(bool(s["ok"]) for s in ran),
                     "steps_failed": [n for n, s in report["steps"].items() if s["rc"] not in (None, 0)],
                     "steps_skipped": [n for n, s in report["steps"].items() if s["rc"] is None]}
json.dump(report, open(out, "w"), indent=1)
print(json.dumps(report["summary"]))
EOF
wrote=$?
# any step that ran and did not return 0 (null = skipped) fails the check, after the JSON has been written
failed=$(grep -v -c -E '"rc": (0|null),' "$STEPS")
if [ "$wrote" != 0 ]; then
  echo "gpu_check: could not write $JSON (exit $wrote)" >&2
  exit 2
fi
echo "gpu_check: $JSON"
if [ "$failed" != 0 ]; then
  echo "gpu_check: $failed step(s) failed" >&2
  exit 1
fi
