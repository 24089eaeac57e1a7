#!/usr/bin/env bash
# Writes requirements/constraints.txt, the lock `make install` passes to every pip line (-c). Run through
# `make lock` (never from CI: CI installs from the lock, it does not move it). Steps:
#   1. a fresh venv in a temporary folder gets the Makefile's package lists exactly as `make install` installs
#      them, minus the lock (so it takes what the registry serves today), with the CPU torch ($TORCH_CPU);
#      LOCK_VENV=<venv> freezes that existing venv instead (how the first lock was taken from a tested .venv);
#   2. `pip freeze --all` of it, less pip, torch (the Makefile's TORCH_SPEC pins torch exactly, and a pin here
#      would refuse the GPU build) and dupfast itself;
#   3. the packages only a GPU torch ($TORCH_GPU) brings (cuda-*, nvidia-*), resolved against step 2's pins with
#      --dry-run (metadata only, nothing CUDA is downloaded), appended so the GPU install is locked too.
# Environment (set by the Makefile): PY TORCH_CPU TORCH_GPU PACKAGES ASSETS_NODEPS ASSETS LOCK_OUT [LOCK_VENV].
set -euo pipefail
: "${PY:?}" "${TORCH_CPU:?}" "${TORCH_GPU:?}" "${PACKAGES:?}" "${ASSETS_NODEPS:?}" "${ASSETS:?}" "${LOCK_OUT:?}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [ -n "${LOCK_VENV:-}" ]; then
  venv=$LOCK_VENV
else
  venv=$tmp/venv
  "$PY" -m venv "$venv"
  # same order and flags as the Makefile's install recipe; word splitting of the lists is intended
  "$venv/bin/pip" install -q "$TORCH_CPU"
  # shellcheck disable=SC2086
  "$venv/bin/pip" install -q $PACKAGES
  # shellcheck disable=SC2086
  "$venv/bin/pip" install -q --no-deps $ASSETS_NODEPS
  # shellcheck disable=SC2086
  "$venv/bin/pip" install -q $ASSETS
fi

# comment lines (pip's note on the editable dupfast) and editable/URL requirements cannot be constraints
"$venv/bin/pip" freeze --all --exclude pip --exclude torch --exclude dupfast | grep -E '^[A-Za-z0-9]' \
  | grep -v ' @ ' > "$tmp/cpu.txt"
# GPU torch's own deps, resolved under the CPU pins: a conflict here means the two torch builds disagree
"$venv/bin/pip" install -q --dry-run --ignore-installed --report "$tmp/gpu.json" -c "$tmp/cpu.txt" "$TORCH_GPU"

source=${LOCK_VENV:-a fresh venv}
"$venv/bin/python" - "$tmp/cpu.txt" "$tmp/gpu.json" "$LOCK_OUT" "$TORCH_CPU" "$TORCH_GPU" "$source" <<'EOF'
import json, platform, re, sys, time

cpu_file, gpu_file, out, torch_cpu, torch_gpu, source = sys.argv[1:7]


def key(name):
    return re.sub(r"[-_.]+", "-", name).lower()


cpu = sorted((ln.strip() for ln in open(cpu_file) if ln.strip()), key=lambda ln: key(ln.split("==")[0]))
have = {key(ln.split("==")[0]) for ln in cpu}
gpu = sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in json.load(open(gpu_file))["install"]
             if key(i["metadata"]["name"]) not in have | {"torch"})
head = f"""# The lock: exact versions of everything `make install` puts in .venv, used by each of its pip lines as
# `pip install -c requirements/constraints.txt ...`. Written by `make lock` (requirements/lock.sh)
# from {source} on {time.strftime('%Y-%m-%d')}, Python {platform.python_version()}, {platform.system()} \
{platform.machine()}.
# torch is not here: the Makefile's TORCH_SPEC pins it ({torch_cpu} without a GPU, {torch_gpu} with one).
"""
with open(out, "w") as f:
    f.write(head + "\n".join(cpu) + "\n")
    f.write(f"\n# only with TORCH_SPEC={torch_gpu}: the CUDA packages it brings, resolved under the pins above\n")
    f.write("\n".join(gpu) + "\n")
print(f"lock: {len(cpu)} + {len(gpu)} GPU-only pins -> {out}")
EOF
