# The two commands of a fresh machine: `make demo` and `make test`. Both install first.
VENV ?= .venv
PY := $(VENV)/bin/python
CXR := $(VENV)/bin/cxr

.PHONY: install demo demo-dicom test test-fast bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,dev]'
	touch $@

install: $(VENV)/.installed

# The main job on the embedded default: the retraining flow on synthetic data (quick profile).
demo: install
	$(CXR) run

# The same demo on DICOM input: the synthetic set as DICOM files with fake patient
# identifiers in their headers (patients grouped by a salted hash of PatientID).
demo-dicom: install
	test -d .cxr/demo-dicom || $(CXR) data synth .cxr/demo-dicom --format dicom --n-per-class 400
	$(CXR) run --data-dir .cxr/demo-dicom --profile quick

# The whole suite, slow and integration tests included (what CI runs). Real-data and PostgreSQL
# tests run when CXR_REAL_DATA / CXR_TEST_POSTGRES_URL are set and skip otherwise.
# Test files run in parallel, each whole on one worker (its module fixtures built once):
# one worker per core, at most 4 (TEST_WORKERS=0 runs them in one process).
TEST_WORKERS ?= auto
test: install
	GX_ANALYTICS_ENABLED=false $(PY) -m pytest -n $(TEST_WORKERS) --maxprocesses 4 \
	  --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The quick loop while developing: no slow tests, no real servers.
test-fast: install
	GX_ANALYTICS_ENABLED=false $(PY) -m pytest -n $(TEST_WORKERS) --maxprocesses 4 \
	  --dist loadfile --no-loadscope-reorder -m "not slow and not integration" $(PYTEST_ARGS)

# Benchmarks on the real images (set CXR_REAL_DATA); each prints its figures.
bench: install
	$(PY) benchmarks/scan.py
	$(PY) benchmarks/input_pipeline.py
	$(PY) benchmarks/predict_throughput.py
	$(PY) benchmarks/train_throughput.py
