# GPU round (issue gpu-truth), call 3b, on the machine of call 3: the base commit 96f8570
# (its tree carried as .device/base_96f8570, made by `git archive 96f8570`) and this tree, the
# same batch-1 bench one after the other. Run through the device tool from the repository root.
export PYTHONUNBUFFERED=1
ARGS="--shape 7b --batch 1 --decode-batches 1 --k 1,2 --new-tokens 128 --iters 10 --repeats 3 --trajectory one-token,tiny_gsm --extra adaptive-delta:0,adaptive-delta:1.0 --warmup-processes 0"
nvidia-smi -L > $OUT/gpu.txt
(cd .device/base_96f8570 && timeout 200 python3 -m reuse_exp.cli bench $ARGS --json $OUT/base_bench.json --markdown $OUT/base_bench.md > $OUT/base_bench.log 2>&1); echo "base bench exit $?" >> $OUT/gpu.txt
timeout 200 python3 -m reuse_exp.cli bench $ARGS --json $OUT/head_bench.json --markdown $OUT/head_bench.md > $OUT/head_bench.log 2>&1; echo "head bench exit $?" >> $OUT/gpu.txt
cat $OUT/gpu.txt; grep -E "small-block|tok/s at k=1|saving" $OUT/base_bench.md $OUT/head_bench.md | head -20
