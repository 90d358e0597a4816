# make bench: the main job (benchmarks/bench_attn.py; writes benchmarks/out/); make test: every test.
# Each sets up what it needs: .venv from requirements-dev.txt (unless python3 has a CUDA
# torch, see scripts/pick_python.sh), and the C++/CUDA extension built in place.
PYTHON ?= $(shell bash scripts/pick_python.sh)
export PYTHONPATH := $(CURDIR)

.PHONY: env ext ctest test bench bench-model summary gpu-check clean

env:
ifeq ($(PYTHON),.venv/bin/python)
env: .venv/.installed
endif

.venv/.installed: requirements-dev.txt
	python3 -m venv .venv
	.venv/bin/python -m pip install -q -r requirements-dev.txt
	# the source tree on the venv's path, as an editable install would put it (no second build)
	.venv/bin/python -c "import site, os; open(os.path.join(site.getsitepackages()[0], 'rsir_kernels_src.pth'), 'w').write('$(CURDIR)\\n')"
	touch $@

# The ops library (rsir_kernels/librsir_ops.so); a failed build leaves the package working without `cpp`.
# Without a GPU the CUDA part is left out (CI compiles the CUDA core through CMake in ctest).
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
ext: env
	RSIR_NO_CUDA=$(if $(filter 1,$(HAS_GPU)),0,1) $(PYTHON) setup.py -q build_ext --inplace || echo "warning: the C++ extension did not build; backend 'cpp' unavailable"

# C++ unit tests of the torch-free cores (CMake + ctest); CMake's build of the ops library too.
ctest:
	cmake -S . -B build/cmake -DRSIR_SANITIZE=ON -DCMAKE_BUILD_TYPE=Release -DRSIR_PYTHON=$(if $(findstring /,$(PYTHON)),$(abspath $(PYTHON)),$(PYTHON))
	cmake --build build/cmake -j2
	ctest --test-dir build/cmake --output-on-failure

# pytest-xdist: JOBS workers (every test is independent; the GPU tests share the one device)
JOBS ?= 2
test: env ext ctest
	$(PYTHON) -m pytest tests -q -n $(JOBS)

# The benchmarks write to benchmarks/out/ (ignored by git): a clone stays clean. OUT=DIR writes
# elsewhere; make bench-refresh (or OUT=benchmarks/results) refreshes the committed figures.
bench: env ext
	$(PYTHON) benchmarks/bench_attn.py $(if $(OUT),--out $(OUT))

.PHONY: bench-refresh
bench-refresh: env ext
	$(PYTHON) benchmarks/bench_attn.py --out benchmarks/results

bench-model: env ext
	$(PYTHON) benchmarks/bench_model.py $(if $(OUT),--out $(OUT))

# Backbone + FPN of rsir_tiny (cpp, reference) and Swin-T at 800x1333 and 512x2048, FLOPs at the
# paper's sizes (benchmarks/bench_dense.py; about 20 minutes on 2 loaded cores).
.PHONY: bench-dense
bench-dense: env ext
	$(PYTHON) benchmarks/bench_dense.py $(if $(OUT),--out $(OUT))

# On a lent GPU machine: build, the GPU test suite, compute-sanitizer, both benchmarks.
# OUT= overrides the script's default folder, benchmarks/results/gpu_<device>/ (a committed record)
OUT ?=
gpu-check:
	bash scripts/gpu_check.sh $(OUT)

summary: env
	$(PYTHON) -m rsir_kernels.models

clean:
	rm -rf build rsir_kernels/*.so .pytest_cache

# Property cases against the float64 reference at scale (scripts/fuzz.py): every backend,
# every ISA build of the CPU core; prints a progress bar and the tag of any failing case.
# JOBS worker processes at once, one thread each.
.PHONY: fuzz
fuzz: env ext
	$(PYTHON) scripts/fuzz.py --cases $(or $(N),1000) --jobs $(JOBS)

# python -m rsir_kernels.train on scikit-learn's digits: 2 processes (torchrun, DDP on gloo, one
# thread each), rsir_micro, 30 epochs; runs/<time>-rsir_micro-digits/ gets last.pt,
# metrics.jsonl and curves.png.
.PHONY: train-demo
train-demo: env ext
	OMP_NUM_THREADS=1 $(PYTHON) -m torch.distributed.run --standalone --nproc_per_node 2 \
		-m rsir_kernels.train --data digits --model rsir_micro --epochs 30 --batch-size 64 --backend cpp

# examples/dense_demo on the synthetic shapes (docs/dense_tasks.md): Mask R-CNN with an rsir_micro
# FPN backbone (COCO bbox/segm AP with pycocotools each epoch) and UPerNet on tu-rsir_micro
# (held-out mIoU), 2 processes (torchrun, DDP on gloo, one thread each), from scratch;
# runs/<time>-maskrcnn-rsir_micro-shapes/ and runs/<time>-upernet-rsir_micro-shapes/ get
# metrics.jsonl, last.pt and ap_curve.png / miou_curve.png.
.PHONY: detection-demo segmentation-demo
detection-demo: env ext
	OMP_NUM_THREADS=1 $(PYTHON) -m torch.distributed.run --standalone --nproc_per_node 2 \
		-m examples.dense_demo.detect --model rsir_micro --epochs 10 --max-minutes 18

segmentation-demo: env ext
	OMP_NUM_THREADS=1 $(PYTHON) -m torch.distributed.run --standalone --nproc_per_node 2 \
		-m examples.dense_demo.segment --model rsir_micro --epochs 16 --max-minutes 14
