#!/usr/bin/env bash
# Creates .venv with everything bilevel_maml needs, on a fresh machine, with no manual steps.
# Each step encodes a dependency fact from DEVELOPERS.md; see docs/install.md for the why.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$here/.venv}"
python="${PYTHON:-python3}"
cache="${BILEVEL_MAML_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bilevel_maml}"
wheels="$cache/wheels"
stamp="$venv/.bilevel_maml-installed"
torch_pair=(torch==2.13.0 torchvision==0.28.0)
l2l_version=0.2.0

if [[ -f "$stamp" && "$stamp" -nt "$here/setup.cfg" && "$stamp" -nt "$here/tools/bootstrap.sh" ]]; then
    exit 0
fi

"$python" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"bilevel_maml needs Python >= 3.11, found {sys.version.split()[0]}")
PY

[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
# The machine's pip config names local index folders that lack most projects; pip warns once
# per project about each, which buries real errors.
pip() {
    "$venv/bin/python" -m pip "$@" 2> >(grep -v -e 'is ignored: it is neither a file nor a directory' \
        -e 'non-standard dependency specifier' -e 'non standard dependency specifier' \
        -e 'learn2learn 0.2.0 requires \(gsutil\|qpth\)' -e 'dependency conflicts' \
        -e 'A new release of pip' -e 'To update, run:' >&2)
}

# betty-ml 0.1.1 declares `torch>=1.6.*`, which pip >= 24.1 refuses to parse.
pip install --quiet "pip<24.1" wheel

# The machine's find-links holds a +cpu torch whose operators torchvision cannot register
# ("torchvision::nms does not exist"); the index's matched pair works on CPU and GPU.
if ! "$venv/bin/python" -c "import torchvision" >/dev/null 2>&1; then
    pip --isolated install --quiet --disable-pip-version-check "${torch_pair[@]}"
fi

# learn2learn 0.2.0 ships Cython-generated C that does not compile on Python 3.11
# (longintrepr.h moved); regenerating it with Cython 3 fixes the build.
l2l_wheel="$(ls "$wheels"/learn2learn-"$l2l_version"-*.whl 2>/dev/null | head -n 1 || true)"
if [[ -z "$l2l_wheel" ]]; then
    pip install --quiet "cython>=3" numpy
    build="$(mktemp -d)"
    trap 'rm -rf "$build"' EXIT
    pip download --quiet --no-deps --no-binary :all: "learn2learn==$l2l_version" -d "$build"
    tar -xzf "$build"/learn2learn-"$l2l_version".tar.gz -C "$build"
    src="$build/learn2learn-$l2l_version"
    for pyx in "$src"/learn2learn/data/*.pyx; do
        "$venv/bin/cython" -3 "$pyx"
    done
    mkdir -p "$wheels"
    pip wheel --quiet --no-deps --no-build-isolation -w "$wheels" "$src"
    l2l_wheel="$(ls "$wheels"/learn2learn-"$l2l_version"-*.whl | head -n 1)"
fi
pip install --quiet --no-deps "$l2l_wheel"

# learn2learn's metadata pulls in gsutil, a cloud CLI it never imports, with dozens of packages;
# what it does import (gym, numpy, scipy, tqdm, requests) is in our own list, installed instead.
mapfile -t requirements < <("$venv/bin/python" - "$here/setup.cfg" <<'PY'
import configparser, sys
cfg = configparser.ConfigParser()
cfg.read(sys.argv[1])
extras = cfg["options.extras_require"]
options = cfg["options"]["install_requires"].split() + extras["dev"].split() + extras["docs"].split()
print("\n".join(r for r in options if not r.startswith("learn2learn")))
PY
)
pip install --quiet "${requirements[@]}"
pip install --quiet --no-deps -e "$here"

# (learn2learn's gym import prints a deprecation notice; show it only if the import fails)
if ! check=$("$venv/bin/python" -c "import bilevel_maml, betty, learn2learn, torchvision, wandb" 2>&1); then
    echo "$check" >&2
    exit 1
fi
touch "$stamp"
