#!/usr/bin/env bash
# Build (or update) a virtual environment exactly as Binder builds its own:
# binder/requirements.txt (torch's CPU build), then binder/postBuild (regedu and
# every other package), every version from requirements/lock.txt.
#   tools/build_env.sh VENV [PYTHON]
# torch is installed only when VENV cannot import it, so a GPU user's CUDA build
# of the same version stays. TORCH_INDEX=<url> takes torch from that index instead.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$1
python=${2:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
py="$venv/bin/python"
if ! "$py" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_INDEX:-}" ]; then
    torch=$(sed -n 's/^torch==//p' requirements/lock.txt)
    "$py" -m pip install -c requirements/lock.txt "torch==$torch" \
      --index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple
  else
    # An unreachable CPU index (a local wheel house serves torch) is asked once, not
    # five times; the second try, with retries, covers a flaky network.
    "$py" -m pip install --retries 0 -r binder/requirements.txt ||
      "$py" -m pip install -r binder/requirements.txt
  fi
fi
"$py" -c "import torch; print('torch', torch.__version__, 'CUDA' if torch.cuda.is_available() else 'CPU')"
PATH="$(cd "$venv/bin" && pwd):$PATH" bash binder/postBuild
