#!/usr/bin/env bash
# Regenerate the hash-pinned lock files in requirements/ (docs/builds.md).
#
#   requirements/update.sh                 re-lock; keep every pin that still fits pyproject.toml
#   requirements/update.sh -P cryptography  also move these packages to their newest allowed
#                                          version (a security fix); -P may repeat
#   requirements/update.sh --upgrade       move every package to its newest allowed version
#   TORCH_VARIANT=cu128 requirements/update.sh
#                                          write requirements/runtime-cu128.lock only: the
#                                          runtime lock with PyTorch's CUDA 12.8 build (GPU sites)
#
# `make lock` runs the first form. Arguments are passed to every pip-compile call.
# Needs the package registries (PyPI; for torch the PyTorch index or a pip
# find-links folder that holds the wheel) and takes a few minutes: pip-compile
# fetches the sha256 of every file of every locked release.
set -euo pipefail
cd "$(dirname "$0")/.."
REQ=requirements
PY=${PY:-$(command -v python3.11 || command -v python3)}
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "the locks are for Python 3.11"'
VARIANT=${TORCH_VARIANT:-cpu}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/$VARIANT}

# pip-compile runs from a throwaway venv: pip from pip.lock, pip-tools from
# tools.lock, both hash-checked (the tools that write the locks are locked too).
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install --quiet --require-hashes -r "$REQ/pip.lock"
"$WORK/venv/bin/python" -m pip install --quiet --require-hashes -r "$REQ/tools.lock"

# torch: the build is part of the version (2.13.0+cpu). The constraint keeps the
# resolver off PyPI's plain torch, a CUDA build of several GB; its version comes
# from pyproject.toml's pin.
TORCH_VERSION=$("$PY" - <<'EOF'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(next(m[1] for d in deps if (m := re.fullmatch(r"torch==([\w.]+)", d.strip()))))
EOF
)
printf '%s\n' \
    "# Written by requirements/update.sh from pyproject.toml's torch pin: the $VARIANT build." \
    "torch==$TORCH_VERSION+$VARIANT" > "$REQ/torch-$VARIANT.txt"

# The PyTorch index only where it answers (pip would retry it for every package);
# without it, torch must come from a find-links folder in pip's configuration.
PIP_ARGS=""
if "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)' \
        "$TORCH_INDEX/torch/" 2>/dev/null; then
    PIP_ARGS="--extra-index-url $TORCH_INDEX"
else
    echo "note: $TORCH_INDEX does not answer; torch comes from pip's own configuration" >&2
fi

compile() {
    CUSTOM_COMPILE_COMMAND="requirements/update.sh" "$WORK/venv/bin/pip-compile" \
        --quiet --generate-hashes --allow-unsafe --strip-extras \
        --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
        --pip-args "$PIP_ARGS" "$@"
}

if [ "$VARIANT" != cpu ]; then
    compile -c "$REQ/torch-$VARIANT.txt" -o "$REQ/runtime-$VARIANT.lock" "$@" pyproject.toml
    echo "wrote $REQ/runtime-$VARIANT.lock (docs/builds.md, GPU sites)"
    exit 0
fi

compile -o "$REQ/pip.lock" "$@" "$REQ/pip.in"
compile -c "$REQ/pip.lock" -o "$REQ/tools.lock" "$@" "$REQ/tools.in"
# runtime: the project's dependencies (the Docker images); dev: runtime plus the
# `dev` extra at the same versions (make setup, CI); build: hatchling, the build
# backend, at versions that agree with dev.
compile -c "$REQ/torch-cpu.txt" -o "$REQ/runtime.lock" "$@" pyproject.toml
compile -c "$REQ/runtime.lock" --extra dev -o "$REQ/dev.lock" "$@" pyproject.toml
compile -c "$REQ/dev.lock" --build-deps-for wheel --build-deps-for editable --only-build-deps \
    -o "$REQ/build.lock" "$@" pyproject.toml
echo "updated $REQ/*.lock: review the diff, run make setup and the tests, commit"
