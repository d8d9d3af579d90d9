#!/usr/bin/env bash
# The 2-GPU run of docs/multi-gpu.md, as made on the lent 2x H200 machine (`nvidia-h200-x2`):
# a copy of this tree at .dev_dist with the missing Python packages as wheels in .dev_dist/.whl,
# started as `cd .dev_dist && bash docs/multi_gpu/device_run.sh`. Output goes to $OUT.
set -u
OUT=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # leave NVLink multicast off
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
git init -q -b main && git add -A && git -c user.name=dev -c user.email=dev@localhost commit -qm "device copy"
nvidia-smi -L
export MLFLOW_TRACKING_URI=sqlite:////tmp/store/mlflow.db && mkdir -p /tmp/store
RUN="--model ${MODEL:-random:7b} --limit ${LIMIT:-16} --max-new-tokens ${NEW:-64} --decode-path eager --experiment dp"
for n in 1 2; do
  python3 -m reuse_exp.cli run $RUN --processes $n > $OUT/run_$n.log 2>&1; echo "run --processes $n: exit $?"
done
python3 docs/multi_gpu/check.py same dp 2>&1 | tee $OUT/same.txt
GRID="--task tiny_gsm --limit 2 -P max_new_tokens=32 -P decode_path=eager --k 1,2 --subset first,last --jobs-dir /tmp/jobs"
python3 -m reuse_exp.cli grid run $GRID --experiment grid_local > $OUT/grid_local.log 2>&1; echo "grid local: exit $?"
python3 -m reuse_exp.cli grid run $GRID --experiment grid_submitit --executor submitit-local \
  > $OUT/grid_submitit.log 2>&1; echo "grid submitit-local: exit $?"
for e in grid_local grid_submitit; do python3 docs/multi_gpu/check.py gpus $e 2>&1 | tee $OUT/$e.txt; done
cp /tmp/store/mlflow.db $OUT/ 2>/dev/null
