# GPU round 3 in one lease: the benchmark (7B shape, bf16; forwards at batch 1/8/32/64, decodes at
# batch 1 on the one-token and the bundled tiny_gsm trajectory, the drift policies' decision cost
# at drift 0, the compiled path beside the default one, fresh-process warm-up), then the GPU tests.
# Run through the device tool from the repository root; $OUT comes back.
export PYTHONUNBUFFERED=1
{ nvidia-smi -L; python3 -c "import torch; print(torch.__version__, torch.version.cuda)"; } > $OUT/gpu.txt
timeout 380 python3 -m reuse_exp.cli bench --shape 7b --batch 1,8,32,64 --decode-batches 1 --k 1,2 \
  --subset first --new-tokens 128 --repeats 3 --trajectory one-token,tiny_gsm \
  --extra adaptive-delta:0,depth-delta:0,adaptive-delta:1.0 --compare-compiled --check-tokens 64 \
  --json $OUT/bench.json --markdown $OUT/bench.md > $OUT/bench.log 2>&1
echo "bench exit $?" >> $OUT/gpu.txt
timeout 150 python3 -m pytest -q -o addopts="" -p no:cacheprovider tests/test_gpu.py tests/test_fast_path.py \
  -k "not tracked" -rxs > $OUT/gpu_tests.log 2>&1
echo "tests exit $?" >> $OUT/gpu.txt
cat $OUT/gpu.txt; tail -25 $OUT/bench.log; tail -12 $OUT/gpu_tests.log
