source .gpu/on-device.sh && source bench/gpu_env.sh || { echo "env failed"; exit 1; }
TIMEFORMAT="%R s"
{ echo "PYTHONPYCACHEPREFIX=$PYTHONPYCACHEPREFIX"; echo "import:"; time python -c "from transformers import AutoConfig; import torch, sympy, numpy"; } > $OUT/env_check.txt 2>&1
cat $OUT/env_check.txt
timeout 330 python bench/pipeline_gpu.py --data .gpu/alpaca_en_demo.json --out $OUT --work /tmp/gp > $OUT/pipeline.log 2>&1; echo "pipeline rc $?"
python - <<'PY'
import json, os
d = json.load(open(os.environ["OUT"] + "/pipeline_gpu.json"))
print({k: d[k] for k in ("pipeline_wall_s", "training_s", "other_stages_share")}, [(s["flow"], s["seconds"]) for s in d["stages"]])
print(d["export_timings"])
PY
