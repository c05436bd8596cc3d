# The two commands of the README:
#   make demo   fetch the default model and data, build, train on the movie-review split, print test accuracy
#   make test   fetch what the tests need, build, run every test
CARGO  ?= cargo
PYTHON ?= python3
MODEL  := assets/models/all-MiniLM-L6-v2
DATA   := assets/data/movie-reviews
BIN    := target/release/softprompt
RUN    := runs/movie-reviews
VENV   := .venv-ref
PYVENV := .venv-py

.PHONY: demo test python packages assets build fixtures interop sweep report bench clean serve-bench memory-bench fuzz api-check soak

assets:
	$(PYTHON) scripts/fetch_assets.py

build:
	$(CARGO) build --release

# An interrupted demo continues from its last checkpoint; a finished one just reports again.
demo: assets build
	$(BIN) train --model $(MODEL) --train $(DATA)/train.tsv --dev $(DATA)/dev.tsv --output $(RUN) \
		$$(test -f $(RUN)/checkpoint.safetensors && echo --resume)
	@echo "== test split =="
	$(BIN) eval --model $(MODEL) --adapter $(RUN) --data $(DATA)/test.tsv

# The Rust tests (with the `mpi` feature: `mpirun -np 2` on loopback), then the Python binding's
# (pytest, in a venv this file builds).
test: assets python packages
	$(CARGO) test --release --features softprompt-cli/mpi
	$(PYVENV)/bin/python -m pytest -q crates/softprompt-py/tests

# `import softprompt` in $(PYVENV): the binding built by maturin from this checkout.
$(PYVENV)/bin/maturin:
	$(PYTHON) -m venv $(PYVENV)
	$(PYVENV)/bin/pip install --quiet --upgrade pip
	$(PYVENV)/bin/pip install --quiet "maturin>=1.9,<2" pytest numpy pandas

python: $(PYVENV)/bin/maturin
	PATH="$(CURDIR)/$(PYVENV)/bin:$$PATH" $(PYVENV)/bin/pip install --quiet --no-build-isolation ./crates/softprompt-py

# Open MPI and libclang (rsmpi's bindings are generated at build time) and the plots' font, from Debian's packages.
packages:
	scripts/need_packages.sh

# The reference side: PyTorch + transformers + peft, for fixtures and the PEFT round trip (not CI).
$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet torch transformers peft safetensors gguf

fixtures: assets $(VENV)/bin/python
	$(VENV)/bin/python scripts/make_fixtures.py

interop: assets build $(VENV)/bin/python
	$(VENV)/bin/python scripts/interop.py

# Speed against PyTorch + peft, measured alternately on this machine (needs ../shared/reference).
bench: assets build $(VENV)/bin/python
	$(PYTHON) scripts/bench_compare.py --python $(VENV)/bin/python

serve-bench: assets build
	scripts/serve_bench.sh

# Peak RSS of training SmolLM2 with the GGUF dequantized at load and with --keep-quantized.
memory-bench: assets build
	scripts/memory_bench.sh

# Every parser of other people's bytes under libFuzzer (cargo-fuzz, nightly): FUZZ_RUNS executions
# per target (or FUZZ_SECONDS, whichever comes first) from a corpus of real files; a crash stops it
# and leaves its input in fuzz/artifacts.
FUZZ_RUNS    ?= 1000000
FUZZ_SECONDS ?= 1800
FUZZ_TARGETS := data_rows adapter_dir safetensors_file gguf_file server_bodies
fuzz: assets
	command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz
	cd fuzz && $(CARGO) +nightly fuzz build -O && target/x86_64-unknown-linux-gnu/release/seed_corpus
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		echo "== $$t"; \
		$(CARGO) +nightly fuzz run -O $$t corpus/$$t -- -runs=$(FUZZ_RUNS) -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 \
			-max_len=65536 -print_final_stats=1 > fuzz-$$t.log 2>&1 || { tail -40 fuzz-$$t.log; exit 1; }; \
		grep -E "^(Done|stat::number_of_executed_units|stat::peak_rss_mb)" fuzz-$$t.log; \
	done

# The HTTP API against its own OpenAPI document (schemathesis), and the 10-minute hostile soak.
api-check: assets build
	scripts/server_checks.sh api

soak: assets build
	scripts/server_checks.sh soak

# The measurements behind the training defaults (experiments/defaults.toml; decision 11).
sweep: assets build
	$(BIN) sweep --config experiments/defaults.toml --output sweeps/defaults

# The paper's experiments on our models (experiments/paper.toml, decoder.toml; the findings
# written over them by hand in experiments/findings.md): about 2 hours of training on 2 cores,
# resumable (run it again to continue); docs/results.md and docs/results/*.png come out.
report: assets build
	$(BIN) sweep --config experiments/paper.toml --output sweeps/paper
	$(BIN) sweep --config experiments/decoder.toml --output sweeps/decoder
	mkdir -p docs/results
	cp sweeps/paper/*.png sweeps/decoder/*.png docs/results/
	{ echo "<!-- written by make report from experiments/findings.md and sweeps/*/report.md -->"; \
	  cat experiments/findings.md; tail -n +2 sweeps/paper/report.md; tail -n +2 sweeps/decoder/report.md; } \
	  | sed 's#](\([^)/]*\.png\))#](results/\1)#' > docs/results.md

clean:
	rm -rf target runs
