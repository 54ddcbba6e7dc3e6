#!/usr/bin/env bash
# Set up mmdp on a fresh Debian/Ubuntu machine: the Fashion-MNIST reference data
# (Debian package), a virtual environment in .venv, and mmdp with its test extras
# at the pinned versions in constraints.txt. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-python3}
packages=""
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || packages="dataset-fashion-mnist"
# Debian and Ubuntu ship venv's pip apart from Python (python3-venv): without it `python3 -m venv` fails
# after making .venv/bin/python, so a pip in .venv, not python, is what says the venv is whole.
[ -x .venv/bin/pip ] || "$python" -c "import ensurepip" 2>/dev/null ||
  packages="$packages python$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
if [ -n "$packages" ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages
fi

[ -x .venv/bin/pip ] || "$python" -m venv --clear .venv
.venv/bin/python -m pip install -q --upgrade pip
# constraints.txt pins what installs fast here (loose botocore/boto3
# cost pip minutes of backtracking); pyproject.toml keeps the ranges.
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
echo "mmdp is set up in .venv"
