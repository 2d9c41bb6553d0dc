# hf engine on the GPU: packed rows through the varlen kernel (fp32 activations cast to bf16), and `sftflow train` end to end.
set -u
R=/tmp/res; D=.gpu/alpaca_en_demo.json; rm -rf $R; mkdir -p $R/h; export SFTFLOW_PROGRESS=0
( CUDA_VISIBLE_DEVICES=0 timeout 200 python bench/train_gpu.py --shape 1b --data $D --steps 15 --recipes sftflow-hf-packed@8 \
    --work /tmp/w0 --out $R/h > $R/h.out 2> $R/h.err; echo "bench rc=$?" >> $R/times.txt ) &
( export CUDA_VISIBLE_DEVICES=1 SFTFLOW_HOME=/tmp/e2e
  python -m sftflow ingest $D --drop-id alpaca --json > $R/e2e.jsonl 2> $R/e2e.err
  python -c "import sys; from pathlib import Path; sys.path.insert(0,'.'); from bench.train_gpu import build_model; build_model('1b', Path('/tmp/e2em'), Path('$D'))" >> $R/e2e.err 2>&1
  timeout 200 python -m sftflow train --config flows/configs/llama3_2_1b_qlora.yaml model.name=/tmp/e2em/llama-1b \
      train.engine=hf train.batch_size=8 train.max_steps=6 train.save_steps=3 train.logging_steps=1 --json >> $R/e2e.jsonl 2>> $R/e2e.err
  echo "e2e hf rc=$?" >> $R/times.txt ) &
wait; cat $R/times.txt; cut -c1-900 $R/h.out; cut -c1-700 $R/e2e.jsonl; grep -h "\"end\"" /tmp/e2e/runs/*/progress.jsonl | cut -c1-600; tail -c 800 $R/h.err
cp $R/h.out $OUT/hf_packed.jsonl; cp $R/e2e.jsonl $OUT/e2e_hf.jsonl; tar czf $OUT/res_l.tgz -C /tmp res
