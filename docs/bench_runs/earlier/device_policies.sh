# The policy interface on a GPU: the CUDA-graph tests of every policy (depth included) and a
# batch-1 decode benchmark at the 7B shape with the fixed, adaptive and depth policies.
# Run through the device tool from the repository root; $OUT comes back.
export PYTHONUNBUFFERED=1
nvidia-smi -L > $OUT/gpu.txt; python3 -c "import torch; print(torch.__version__, torch.version.cuda)" >> $OUT/gpu.txt
python3 -m pytest -q -o addopts="" -p no:cacheprovider tests/test_gpu.py tests/test_fast_path.py \
  tests/test_policies.py -k "not tracked" -rxs > $OUT/gpu_tests.log 2>&1; echo "tests exit $?" >> $OUT/gpu.txt
tail -15 $OUT/gpu_tests.log
python3 - <<'PY' > $OUT/bench.md 2>$OUT/bench.err
import dataclasses, json, os
from reuse_exp.engine.bench import BenchArgs, run_bench
from reuse_exp.engine.bench_report import markdown
args = BenchArgs(shape="7b", batch=(1,), k=(1, 2), subset=("first",), new_tokens=128, repeats=3,
                 extra=("adaptive-delta:0", "adaptive-delta:1.0", "depth-delta:0", "depth-delta:1.0"))
command = ("reuse-exp bench --shape 7b --batch 1 --k 1,2 --subset first --new-tokens 128 --repeats 3 "
           "--extra adaptive-delta:0,adaptive-delta:1.0,depth-delta:0,depth-delta:1.0")
result = run_bench(args, command)
with open(os.path.join(os.environ["OUT"], "bench.json"), "w") as f:
    json.dump(dataclasses.asdict(result), f, indent=1)
print(markdown(result))
PY
echo "bench exit $?" >> $OUT/gpu.txt; cat $OUT/gpu.txt $OUT/bench.md; tail -3 $OUT/bench.err
