# Issue 3 on the 2xH200 machine: GPU0 = clean 1B timings + profile; GPU1 = 8B memory, then e2e sftflow train x2 engines.
set -u
R=/tmp/res; D=.gpu/alpaca_en_demo.json; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
date +%T > $R/times.txt; export SFTFLOW_PROGRESS=0
( export CUDA_VISIBLE_DEVICES=0
  timeout 330 python bench/train_gpu.py --shape 1b --data $D --steps 15 \
    --recipes sftflow-unsloth-packed@32,dense,sftflow-hf-packed@8,sftflow-unsloth-packed@64 \
    --profile sftflow-unsloth-packed@32,dense --out $R 2> $R/bench_1b.err; echo "gpu0 done $(date +%T)" >> $R/times.txt ) &
( export CUDA_VISIBLE_DEVICES=1
  timeout 200 python bench/train_gpu.py --shape 8b --data $D --steps 6 --recipes sftflow-unsloth-packed@4 \
    --work /tmp/b8 --out $R 2> $R/bench_8b.err; echo "8b done $(date +%T)" >> $R/times.txt
  export SFTFLOW_HOME=/tmp/e2e
  python -m sftflow ingest $D --drop-id alpaca --json > $R/e2e.jsonl 2> $R/e2e.err
  python -c "import sys; from pathlib import Path; sys.path.insert(0,'.'); from bench.train_gpu import build_model; print(build_model('1b', Path('/tmp/e2em'), Path('$D')))" >> $R/e2e.err 2>&1
  for e in unsloth hf; do
    timeout 150 python -m sftflow train --config flows/configs/llama3_2_1b_qlora.yaml model.name=/tmp/e2em/llama-1b \
      train.engine=$e train.max_steps=10 train.save_steps=5 --json >> $R/e2e.jsonl 2>> $R/e2e.err
    echo "e2e $e rc=$? $(date +%T)" >> $R/times.txt
  done ) &
wait; date +%T >> $R/times.txt
cp $R/*.jsonl $R/profile_*.txt $R/times.txt $OUT/ 2>/dev/null; tar czf $OUT/results.tgz -C /tmp res
cat $R/times.txt $R/*.jsonl; for f in $R/profile_*.txt; do echo "== $f"; head -60 $f; done; tail -5 $R/e2e.err
