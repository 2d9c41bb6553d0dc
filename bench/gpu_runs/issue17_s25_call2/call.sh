# Session 25, call 1: the pipeline with the merged f16 GGUF summed from the base's GGUF and the LoRA GGUF (and the
# registry's GGUF files linked), then the code before (b871d30, a copy in _before/), back to back on one machine.
source .gpu/on-device.sh && source bench/gpu_env.sh || { echo "env failed"; exit 1; }
summary() {
python - "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1] + "/pipeline_gpu.json"))
print({k: d[k] for k in ("pipeline_wall_s", "training_s", "other_stages_share", "error")}, [(s["flow"], s["seconds"]) for s in d["stages"]])
print(d["export_timings"]); print({k: v.get("kl") for k, v in d["parity"].items()})
print(d["training"]["loss_first"], d["training"]["loss_last"], d["evaluation"]["scores"]["candidate"]["eval_loss"])
PY
}
timeout 270 python bench/pipeline_gpu.py --data .gpu/alpaca_en_demo.json --out $OUT/after --work /tmp/gpa > $OUT/after.log 2>&1; echo "after rc $?"
summary $OUT/after
rm -rf /tmp/gpa
cd _before && PYTHONPATH="${PYTHONPATH//$OLDPWD/$PWD}" timeout 270 python bench/pipeline_gpu.py --data ../.gpu/alpaca_en_demo.json --out $OUT/before --work /tmp/gpb > $OUT/before.log 2>&1; echo "before rc $?"
summary $OUT/before
