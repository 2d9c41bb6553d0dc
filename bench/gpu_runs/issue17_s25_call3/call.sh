# Session 25, call 3: the pipeline with the shipped merge dtype (bfloat16; the bench had forced float32), then
# with float16, back to back on one machine, same code.
source .gpu/on-device.sh && source bench/gpu_env.sh || { echo "env failed"; exit 1; }
summary() {
python - "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1] + "/pipeline_gpu.json"))
print({k: d[k] for k in ("pipeline_wall_s", "training_s", "other_stages_share", "error")}, [(s["flow"], s["seconds"]) for s in d["stages"]])
print(d.get("export_timings")); print({k: (v.get("kl"), v.get("passed")) for k, v in d["parity"].items()})
print(d["training"]["loss_first"], d["training"]["loss_last"], d["training_startup"]["first_step_s"], d["evaluation"]["scores"]["candidate"]["eval_loss"])
PY
}
for dtype in bfloat16 float16; do
  timeout 270 python bench/pipeline_gpu.py --data .gpu/alpaca_en_demo.json --out $OUT/$dtype --work /tmp/gp-$dtype --merge-dtype $dtype > $OUT/$dtype.log 2>&1; echo "$dtype rc $?"
  summary $OUT/$dtype
  rm -rf /tmp/gp-$dtype
done
