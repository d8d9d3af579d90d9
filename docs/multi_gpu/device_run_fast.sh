# Data parallel on the fast path, 1 vs 2 GPUs, and the submitit-local grid on the GPUs (H200 x2).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .dev_perf/whl/*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site
mkdir -p /tmp/dp && tar --exclude=./.git --exclude=./.dev_perf --exclude=./.device -cf - . | tar -xf - -C /tmp/dp && cd /tmp/dp
git init -q -b main && git add -A && git -c user.name=dev -c user.email=dev@localhost commit -qm "device copy"
nvidia-smi -L > $OUT/dp.txt
export MLFLOW_TRACKING_URI=sqlite:////tmp/store/mlflow.db && mkdir -p /tmp/store
RUN="--model random:7b --limit 16 --max-new-tokens 64 --experiment dp"
for n in 1 2; do
  timeout -s TERM 130 python3 -m reuse_exp.cli run $RUN --processes $n > $OUT/run_$n.log 2>&1; echo "run --processes $n: exit $?" >> $OUT/dp.txt
done
timeout 30 python3 docs/multi_gpu/check.py same dp >> $OUT/dp.txt 2>&1
GRID="--task tiny_gsm --limit 2 -P max_new_tokens=32 -P decode_path=eager --k 1,2 --subset first,last --jobs-dir /tmp/jobs"
timeout -s TERM 120 python3 -m reuse_exp.cli grid run $GRID --experiment grid_submitit --executor submitit-local \
  > $OUT/grid_submitit.log 2>&1; echo "grid submitit-local: exit $?" >> $OUT/dp.txt
timeout 30 python3 docs/multi_gpu/check.py gpus grid_submitit >> $OUT/dp.txt 2>&1
cat $OUT/dp.txt; tail -12 $OUT/run_1.log $OUT/run_2.log
# The submitit-local grid was re-run in a second call with the wheels of .dev_dist (which hold
# submitit; those of the first call did not): the GRID lines above, after the same install.
