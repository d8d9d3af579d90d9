# GPU round (issue gpu-truth), call 3: the GPU tests (their figures kept), then bench --quick on the 7B shape.
# Run through the device tool from the repository root; $OUT comes back. Each part has its own limit.
export PYTHONUNBUFFERED=1
{ nvidia-smi -L; python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; git log -1 --format=%h; } > $OUT/gpu.txt
REUSE_EXP_GPU_FIGURES=$OUT/accuracy.json timeout 220 python3 -m pytest -q -o addopts="" -p no:cacheprovider tests/test_gpu.py tests/test_fast_path.py -k "not tracked" -rxs --durations=8 > $OUT/gpu_tests.log 2>&1; echo "tests exit $?" >> $OUT/gpu.txt
timeout 230 python3 -m reuse_exp.cli bench --shape 7b --quick --json $OUT/bench.json --markdown $OUT/bench.md > $OUT/bench.log 2>&1; echo "bench exit $?" >> $OUT/gpu.txt
cat $OUT/gpu.txt; tail -30 $OUT/gpu_tests.log; tail -15 $OUT/bench.log
