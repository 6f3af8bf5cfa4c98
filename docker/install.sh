#!/usr/bin/env bash
# Install autodfp and its pinned torch: the one install procedure, used by the Makefile
# (`make install`: a venv, editable) and by docker/Dockerfile.{cpu,gpu} (the image's own
# Python, non-editable), so the two cannot drift.
#
#   docker/install.sh [--venv DIR | --system] [--extras LIST] [--editable | --no-editable]
#                     [--dry-run]
#
#   --venv DIR      create DIR with `$PYTHON -m venv` and install into it (default: .venv)
#   --system        install into $PYTHON itself (the conda Python of the rayproject/ray images)
#   --extras LIST   comma-separated extras of pyproject.toml (default: search,test,onnx,imagenet,dashboard;
#                   '' for none)
#   --editable      pip install -e (default)
#   --no-editable   a regular install: the package is copied into site-packages
#   --dry-run       print the commands instead of running them
#
# Environment:
#   PYTHON           interpreter that makes the venv, or that --system installs into (default python3)
#   TORCH_INDEX_URL  index to take torch from, e.g. https://download.pytorch.org/whl/cpu (CPU-only
#                    wheels); unset: the default index (PyPI's torch wheels pull the CUDA packages)
#
# torch==2.13.0 goes in first: anything that lets pip pick torch itself may pull several GB of
# CUDA packages where a CPU build was wanted.
set -euo pipefail

TORCH_VERSION=2.13.0
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "install.sh: $*" >&2; exit 2; }

mode=venv
venv=.venv
extras=search,test,onnx,imagenet,dashboard
editable=1
dry_run=0

while [[ $# -gt 0 ]]; do
    case "$1" in
        --venv) [[ $# -ge 2 && -n "$2" ]] || die "--venv needs a directory"; mode=venv; venv="$2"; shift 2 ;;
        --venv=*) mode=venv; venv="${1#*=}"; [[ -n "$venv" ]] || die "--venv needs a directory"; shift ;;
        --system) mode=system; shift ;;
        --extras) [[ $# -ge 2 ]] || die "--extras needs a list"; extras="$2"; shift 2 ;;
        --extras=*) extras="${1#*=}"; shift ;;
        --editable) editable=1; shift ;;
        --no-editable) editable=0; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

[[ "$extras" =~ ^[A-Za-z0-9_,-]*$ ]] || die "bad --extras: '$extras' (comma-separated names)"
extras="${extras//,,/,}"; extras="${extras#,}"; extras="${extras%,}"

PYTHON="${PYTHON:-python3}"

quote() {  # a command as a shell line: words quoted only where they need it
    local out=() word
    for word in "$@"; do
        if [[ "$word" =~ ^[A-Za-z0-9_./=:@+%-]+$ ]]; then out+=("$word")
        else out+=("'${word//\'/\'\\\'\'}'"); fi
    done
    echo "${out[*]}"
}

run() {
    if [[ $dry_run -eq 1 ]]; then quote "$@"; else "$@"; fi
}

if [[ $mode == venv ]]; then
    run "$PYTHON" -m venv "$venv"
    pip=("$venv/bin/pip")
else
    pip=("$PYTHON" -m pip)
fi

torch_args=(install --quiet "torch==$TORCH_VERSION")
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    torch_args+=(--index-url "$TORCH_INDEX_URL")
fi
run "${pip[@]}" "${torch_args[@]}"

# The project by its absolute path, so the script works from any directory.
target="$ROOT"
if [[ -n "$extras" ]]; then target="$ROOT[$extras]"; fi
package_args=(install --quiet)
if [[ $editable -eq 1 ]]; then package_args+=(-e); fi
run "${pip[@]}" "${package_args[@]}" "$target"
