# Ground Up: one command per job. Run `make help` for the list.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# The offline data mirror beside the repository, when there is one (absolute: notebooks run in notebooks/).
export BOOK_DATA ?= $(abspath $(wildcard ../shared/data))
# The test run writes results and checkpoints to scratch folders, never over the committed ones.
TEST_ENV := BOOK_PROFILE=smoke BOOK_RESULTS_DIR=$(CURDIR)/_build/test-results \
            BOOK_CHECKPOINT_DIR=$(CURDIR)/_build/test-checkpoints MPLBACKEND=Agg
NB ?= notebooks/*.ipynb
# Every test run trains from scratch: no checkpoint or result of an earlier run is reused.
CLEAN_TEST_STATE := rm -rf _build/test-results _build/test-checkpoints
# Committed outputs come from a cpu or full run (CONTRIBUTING.md); smoke is what CI runs.
PROFILE ?= cpu

.PHONY: help venv book html test unit notebooks lab export check-export results provenance outputs clean \
        reference reference-plan wheels parts unpack-reference

help:
	@echo "make book          set up .venv and build the website into _build/html"
	@echo "make test          set up .venv, run unit tests, the export check, every notebook (smoke), the site build and its browser test"
	@echo "make unit          only the unit tests (tests/)"
	@echo "make notebooks     only the notebooks, smoke profile, under nbmake"
	@echo "make html          only the website build (committed outputs, nothing executed)"
	@echo "make results       regenerate results/README.md and book/results.md from results/*.json"
	@echo "make provenance    which chapters' pages show code that changed after their committed run"
	@echo "make clean         remove _build"
	@echo "make lab           open JupyterLab"
	@echo "make export        write lib/groundup/ from the notebooks' #| export cells"
	@echo "make check-export  fail if lib/ is out of sync with the notebooks"
	@echo "make outputs       execute notebooks in place (NB=..., PROFILE=cpu|full; default cpu) and regenerate the results page"
	@echo "Reference runs on a GPU (book/setup.md):"
	@echo "make wheels        download/build into .whl/ the wheels a GPU machine without network lacks"
	@echo "make parts         split data (DATA=...) and .whl/ into parts in .parts/upload-K, one folder per upload"
	@echo "                   (CHAPTERS=\"07 04\" picks what the chapters need; PART_MB=, UPLOAD_MB= sizes)"
	@echo "make reference-plan  print the chapters a reference run takes, in order, with expected times"
	@echo "make reference     BUDGET=seconds [CHAPTERS=\"07 04\"] [DATA=dir] [PARTS=dir] [WHEELS=dir]"
	@echo "                   [ARCHIVE=path] [MAX_MB=15]: check parts and data, install wheels offline, run"
	@echo "                   the chapters (full profile) within the budget, pack one archive"
	@echo "make unpack-reference ARCHIVE=path  unpack such an archive into this repository"

venv: $(STAMP)
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $@

book: $(STAMP)
	$(PY) tools/results_table.py
	$(MAKE) --no-print-directory html
	@echo "The book is at file://$(CURDIR)/_build/html/index.html"

html: $(STAMP)
	rm -rf _build/html _build/.doctrees _build/jupyter_execute
	$(VENV)/bin/jupyter-book build . --warningiserror --keep-going --quiet

test: $(STAMP)
	$(PY) tools/export.py --check
	$(PY) tools/results_table.py --check
	$(PY) tools/provenance.py --check
	$(MAKE) --no-print-directory html
	$(CLEAN_TEST_STATE)
	$(TEST_ENV) $(PY) -m pytest tests notebooks --nbmake --nbmake-timeout=300 --durations=0

unit: $(STAMP)
	$(PY) -m pytest tests

notebooks: $(STAMP)
	$(CLEAN_TEST_STATE)
	$(TEST_ENV) $(PY) -m pytest notebooks --nbmake --nbmake-timeout=300 --durations=0

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

export: $(STAMP)
	$(PY) tools/export.py

check-export: $(STAMP)
	$(PY) tools/export.py --check

results: $(STAMP)
	$(PY) tools/results_table.py

provenance: $(STAMP)
	$(PY) tools/provenance.py

outputs: $(STAMP)
	BOOK_PROFILE=$(PROFILE) BOOK_RESULTS_DIR=$(CURDIR)/results $(PY) tools/run_notebooks.py --fresh $(NB)
	$(PY) tools/results_table.py

# Reference runs on a GPU: `reference` and `unpack-reference` also run where there is no .venv (the GPU
# machine's own python3, with the carried wheels); empty variables take the tool's defaults.
REF_PY  := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
BUDGET  ?= 600
ARCHIVE ?= _build/reference.tar.gz
MAX_MB  ?= 15
REF_CHAPTERS = $(if $(strip $(CHAPTERS)),--chapters $(CHAPTERS))
REF_PROFILE ?= full

reference:
	$(REF_PY) tools/reference.py run --budget $(BUDGET) $(REF_CHAPTERS) $(if $(DATA),--data $(DATA)) \
	  $(if $(PARTS),--parts $(PARTS)) $(if $(WHEELS),--wheels $(WHEELS)) --archive $(ARCHIVE) --max-mb $(MAX_MB) \
	  --profile $(REF_PROFILE)

reference-plan:
	$(REF_PY) tools/reference.py plan $(REF_CHAPTERS) --budget $(BUDGET)

unpack-reference:
	$(REF_PY) tools/reference.py unpack $(ARCHIVE)

wheels: $(STAMP)
	$(PY) tools/reference.py wheels --dest .whl

parts: $(STAMP)
	$(PY) tools/reference.py parts $(REF_CHAPTERS) $(if $(or $(DATA),$(BOOK_DATA)),--data $(or $(DATA),$(BOOK_DATA))) \
	  --wheels $(or $(WHEELS),.whl) --dest .parts $(if $(PART_MB),--part-mb $(PART_MB)) \
	  $(if $(UPLOAD_MB),--upload-mb $(UPLOAD_MB))

clean:
	rm -rf _build
