#!/bin/bash
# Build .gpu/ for the GPU machine, here, from the project root, after `make` (~2 minutes):
#   bash bench/gpu_prepare.sh
# then carry [".gpu"] and start each device command with:
#   source .gpu/on-device.sh && source bench/gpu_env.sh
#
# ../shared/gpu/wheelhouse.sh gives what the image lacks, from PyPI wheels; three packages of this project
# have none there that works, so they are added from this machine's .venv (all pure Python but llama_cpp):
# - llama-cpp-python (the quantiser and the parity checks' runtime): the portable wheel `make` built, its
#   libraries once each (the wheel copies every .so symlink: 24 MB against the 64 MiB a call carries);
# - diskcache, which llama_cpp imports;
# - rouge-score 0.1.2 (sdist only on PyPI; the wheelhouse finds 0.0.4, whose RougeScorer takes no tokenizer,
#   and every evaluation fails).
# llama.cpp's converter scripts go in .gpu/llama-tools.tgz (bench/gpu_env.sh extracts them), the Alpaca demo
# beside them.
set -euo pipefail
root="$(pwd)"
site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
wheel="$(ls "$HOME"/.cache/sftflow/wheels/llama_cpp_python-*.whl | head -1)"
bash ../shared/gpu/wheelhouse.sh > /dev/null
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
tar xzf .gpu/gpusite.tgz -C "$work"
s="$work/.gpusite"
rm -rf "$s"/rouge_score "$s"/rouge_score-*.dist-info
unzip -q "$wheel" 'llama_cpp/*' 'llama_cpp_python-*.dist-info/*' -d "$s"
for lib in "$s"/llama_cpp/lib/*.so; do
  rm -f "$lib" "$lib".0.*
  ln -s "$(basename "$lib").0" "$lib"
done
cp -a "$site"/rouge_score "$site"/rouge_score-*.dist-info "$site"/diskcache "$site"/diskcache-*.dist-info "$s"/
find "$s" -name '__pycache__' -type d -prune -exec rm -rf {} +
tar czf .gpu/gpusite.tgz -C "$work" .gpusite
tar czf .gpu/llama-tools.tgz -C .sftflow/cache llama.cpp-0.3.36
cp ../shared/datasets/alpaca_en_demo.json .gpu/
du -ch .gpu/* | tail -1
