#!/usr/bin/env bash
# Builds the peer kernels (mamba-ssm, causal-conv1d) for this machine's GPU architecture only and installs
# them into the current Python, with fla (fla-core: pure Python, Triton kernels, nothing to build) beside them.
# Their setup.py files compile for every arch from sm_75 up (an hour or more); one arch takes about 9 minutes on
# the H100 box, so run this once in the background and reuse the wheels.
#
#   scripts/build_peers.sh download [DIR]   fetch the two sdists into DIR (default .peers/sdist) and fla-core's
#                                           wheel into .peers/wheels/any (needs pip to reach an index) - do this
#                                           where there is a network
#   scripts/build_peers.sh build [DIR]      build wheels from the sdists in DIR for the local GPU and install
#                                           them; wheels are kept in .peers/wheels/<arch>-torch<version>
#
# PYTHON picks the interpreter (default python3); MAX_JOBS caps parallel nvcc jobs (default: all cores).
set -euo pipefail

PYTHON=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODE=${1:-}
SDIST_DIR=${2:-$ROOT/.peers/sdist}
PACKAGES=(causal-conv1d mamba-ssm)

die() { echo "error: $*" >&2; exit 2; }

download() {
    mkdir -p "$SDIST_DIR"
    # the SKIP flags only let pip read the metadata without nvcc; nothing is compiled here
    MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
        "$PYTHON" -m pip download --no-deps --no-build-isolation --no-binary :all: -d "$SDIST_DIR" "${PACKAGES[@]}"
    "$PYTHON" -m pip download --no-deps --only-binary :all: -d "$ROOT/.peers/wheels/any" fla-core
    ls -l "$SDIST_DIR" "$ROOT/.peers/wheels/any"
}

# Keeps only the -gencode pair for $1 (e.g. 90) in a setup.py, adding it if the file never lists it.
keep_one_arch() {
    "$PYTHON" - "$1" "$2" <<'PY'
import re, sys
arch, path = sys.argv[1], sys.argv[2]
text = open(path).read()
pair = re.compile(r'(\s*)cc_flag\.append\("-gencode"\)\s*\n\s*cc_flag\.append\("arch=compute_(\d+),code=sm_\d+"\)')
found = [m.group(2) for m in pair.finditer(text)]
if not found:
    sys.exit(f"error: no -gencode list in {path}; the package layout changed, patch it by hand")
kept = False
def keep(match):
    global kept
    if match.group(2) != arch or kept:
        return match.group(1) + "pass"  # keeps the surrounding `if` blocks valid
    kept = True
    return match.group(0)
text = pair.sub(keep, text)
if not kept:  # an arch the package does not list (e.g. sm_89): add it where the list started
    text = text.replace("cc_flag = []", f'cc_flag = ["-gencode", "arch=compute_{arch},code=sm_{arch}"]', 1)
open(path, "w").write(text)
print(f"{path}: gencode list {found} -> [{arch}]")
PY
}

build() {
    command -v nvcc >/dev/null || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] \
        || die "nvcc not found; set CUDA_HOME to a CUDA toolkit (the peers are CUDA-only)"
    export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
    local arch torch_version
    arch=$("$PYTHON" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')") \
        || die "torch sees no CUDA GPU; build the peers on the GPU machine"
    torch_version=$("$PYTHON" -c "import torch; print(torch.__version__)")
    local wheels="$ROOT/.peers/wheels/sm${arch}-torch${torch_version}"
    mkdir -p "$wheels"
    export TORCH_CUDA_ARCH_LIST="${arch:0:-1}.${arch: -1}" MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    for package in "${PACKAGES[@]}"; do
        local module=${package//-/_}
        if ls "$wheels"/"$module"-*.whl >/dev/null 2>&1; then
            echo "reusing $(ls "$wheels"/"$module"-*.whl)"
            continue
        fi
        local sdist
        sdist=$(ls "$SDIST_DIR"/"$module"-*.tar.gz 2>/dev/null | head -n1) \
            || die "no $module sdist in $SDIST_DIR; run '$0 download' where there is a network and copy it here"
        local work
        work=$(mktemp -d)
        tar -xzf "$sdist" -C "$work"
        keep_one_arch "$arch" "$work"/*/setup.py
        echo "building $package for sm_$arch with $MAX_JOBS jobs (about 9 minutes for both on an H100 box)"
        "$PYTHON" -m pip wheel --no-deps --no-build-isolation -w "$wheels" "$work"/*/
        rm -rf "$work"
    done
    "$PYTHON" -m pip install --no-deps --no-index "$wheels"/*.whl
    "$PYTHON" -c "import causal_conv1d, mamba_ssm; print('peers installed:', mamba_ssm.__version__, causal_conv1d.__version__)"
    if ls "$ROOT"/.peers/wheels/any/fla_core-*.whl >/dev/null 2>&1; then
        "$PYTHON" -m pip install --no-deps --no-index "$ROOT"/.peers/wheels/any/fla_core-*.whl
        "$PYTHON" -c "import fla; print('fla installed:', fla.__version__)"
    else
        echo "no fla-core wheel in .peers/wheels/any: the gated_delta bench compares with our kernels only"
    fi
}

case "$MODE" in
    download) download ;;
    build) build ;;
    *) die "usage: $0 download [DIR] | build [DIR]  (see the comment at the top of this script)" ;;
esac
