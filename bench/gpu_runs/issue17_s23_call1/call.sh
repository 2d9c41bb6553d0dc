# Session 23: why fresh processes compile torch/sympy/numpy on the device; the pipeline with bytecode cached;
# the export with one parity check at a time against the default.
source .gpu/on-device.sh
{
python - <<'PY'
import os, sys, sysconfig, importlib.util
print("flags dont_write_bytecode", sys.flags.dont_write_bytecode, "prefix", sys.pycache_prefix)
for name in ("torch", "sympy", "numpy", "transformers"):
    spec = importlib.util.find_spec(name); d = os.path.dirname(spec.origin)
    pyc = os.path.join(d, "__pycache__")
    print(name, d, "writable", os.access(d, os.W_OK), "pycache", os.path.isdir(pyc) and len(os.listdir(pyc)))
print({k: v for k, v in os.environ.items() if k.startswith(("PYTHON", "PIP"))})
PY
SITE=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
TIMEFORMAT="%R s"
echo "import before, first:"; time python -c "from transformers import AutoConfig; import torch, sympy, numpy"
echo "import before, second:"; time python -c "from transformers import AutoConfig; import torch, sympy, numpy"
export PYTHONPYCACHEPREFIX=/tmp/pyc
echo "compileall into $PYTHONPYCACHEPREFIX:"; time python -m compileall -q -j 16 $SITE /tmp/gs/.gpusite $SFTFLOW_CACHE $PWD > /dev/null 2>&1
echo "import with prefix:"; time python -c "from transformers import AutoConfig; import torch, sympy, numpy"
echo "import unsloth with prefix:"; time python -c "import unsloth" > /dev/null 2>&1
} > $OUT/bytecode.txt 2>&1
cat $OUT/bytecode.txt
timeout 330 python bench/pipeline_gpu.py --data .gpu/alpaca_en_demo.json --out $OUT --work /tmp/gp > $OUT/pipeline.log 2>&1; echo "pipeline rc $?"
tail -3 $OUT/pipeline.log
timeout 100 python bench/export.py --shape 1b --data .gpu/alpaca_en_demo.json --parity-slots 1 --work /tmp/eb1 > $OUT/export_slots1.log 2>&1; echo "export slots 1 rc $?"; tail -1 $OUT/export_slots1.log
timeout 100 python bench/export.py --shape 1b --data .gpu/alpaca_en_demo.json --work /tmp/eb2 > $OUT/export_auto.log 2>&1; echo "export auto rc $?"; tail -1 $OUT/export_auto.log
