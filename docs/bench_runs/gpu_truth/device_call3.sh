# GPU round (issue gpu-truth), call 3: the GPU tests (their figures kept), bench --quick on the
# 7B shape, then the base commit 96f8570 (its tree carried as .device/base_96f8570, made
# by `git archive 96f8570`) on the batch-1 rows of the same preset, for ratios on one machine.
# Before the call: mkdir -p .device/base_96f8570 && git archive 96f8570 | tar -x -C .device/base_96f8570
# and pass carry=[".device/base_96f8570"] to the device tool (.device/ is ignored).
# Run through the device tool from the repository root; $OUT comes back. Each part has its own limit.
export PYTHONUNBUFFERED=1
{ nvidia-smi -L; python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } > $OUT/gpu.txt
REUSE_EXP_GPU_FIGURES=$OUT/accuracy.json timeout 180 python3 -m pytest -q -o addopts="" -p no:cacheprovider tests/test_gpu.py tests/test_fast_path.py -k "not tracked" -rxs --durations=8 > $OUT/gpu_tests.log 2>&1; echo "tests exit $?" >> $OUT/gpu.txt
timeout 200 python3 -m reuse_exp.cli bench --shape 7b --quick --json $OUT/bench.json --markdown $OUT/bench.md > $OUT/bench.log 2>&1; echo "bench exit $?" >> $OUT/gpu.txt
BASE="--shape 7b --batch 1 --decode-batches 1 --k 1,2 --new-tokens 128 --iters 10 --repeats 3 --trajectory one-token --extra adaptive-delta:0 --warmup-processes 0"
(cd .device/base_96f8570 && timeout 100 python3 -m reuse_exp.cli bench $BASE --json $OUT/base_bench.json --markdown $OUT/base_bench.md > $OUT/base_bench.log 2>&1); echo "base bench exit $?" >> $OUT/gpu.txt
cat $OUT/gpu.txt; tail -25 $OUT/gpu_tests.log; tail -12 $OUT/bench.log; grep -E "small-block|tok/s at k=1" $OUT/base_bench.md | head
