# Issue 3 follow-up on 2xH200: packed@32 variants (logging every 5 steps) on GPU0 and GPU1 in parallel, dense in the same call.
set -u
R=/tmp/res; D=.gpu/alpaca_en_demo.json; mkdir -p $R; export SFTFLOW_PROGRESS=0
b() {  # gpu name json recipes
  mkdir -p $R/$2
  CUDA_VISIBLE_DEVICES=$1 SFTFLOW_BENCH_TRAIN="$3" timeout 250 python bench/train_gpu.py --shape 1b --data $D --steps 20 \
    --warmup-steps 1 --recipes $4 --work /tmp/w$1 --out $R/$2 > $R/$2.out 2> $R/$2.err; echo "$2 rc=$? $(date +%T)" >> $R/times.txt; }
date +%T > $R/times.txt
( b 0 A '{"logging_steps": 5}' sftflow-unsloth-packed@32
  b 0 B '{"logging_steps": 5, "dataloader_workers": 2}' sftflow-unsloth-packed@32 ) &
( b 1 C '{"logging_steps": 5, "dataloader_workers": 2, "offload_checkpoints": false}' sftflow-unsloth-packed@32
  b 1 D '{}' dense ) &
wait
for x in A B C D; do echo "== $x"; cat $R/$x/*.jsonl | cut -c1-700; done | tee $OUT/variants.txt
cat $R/times.txt; tar czf $OUT/res_k.tgz -C /tmp res
for x in A B C D; do tail -c 600 $R/$x.err; done
