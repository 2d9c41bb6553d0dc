# The benches' environment on the GPU machine, sourced after ../shared/gpu's on-device.sh, from the project root:
#   source .gpu/on-device.sh && source bench/gpu_env.sh
#
# 1. llama.cpp's converter scripts and gguf-py in the model cache, as `make` extracts them from the pinned
#    llama-cpp-python sdist (the export needs them; nothing can be downloaded there). `bash bench/gpu_prepare.sh`
#    makes .gpu/ here: the wheelhouse, the packages it cannot get right, these scripts (.gpu/llama-tools.tgz).
# 2. Bytecode, as an installed environment has it. The machine's packages (torch, sympy, numpy, ...) were
#    installed without .pyc files and PYTHONDONTWRITEBYTECODE=1 is set, so every Python process compiled
#    them from source: `from transformers import AutoConfig; import torch, sympy, numpy` took 12.3 s and
#    10.7 s the second time, 5.8 s with bytecode (bench/RESULTS.md, issue 17 session 23). pip writes the
#    .pyc files when it installs; here they are compiled once per machine (about 15 s on 16 cores, not
#    counted in any bench) into a cache directory the interpreter reads them from.
export SFTFLOW_CACHE=/tmp/sfcache
mkdir -p "$SFTFLOW_CACHE" && tar xzf .gpu/llama-tools.tgz -C "$SFTFLOW_CACHE" || return 1
export PYTHONPYCACHEPREFIX=/tmp/pycache
python -m compileall -q -j 0 "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    /tmp/gs/.gpusite "$SFTFLOW_CACHE" "$PWD" > /dev/null 2>&1 || true
