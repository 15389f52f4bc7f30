# The two commands the README promises, each from a fresh clone:
#   make demo   -- create .venv if missing, install, run the main job on the demo data
#   make test   -- create .venv if missing, install, run the test suite
PYTHON  ?= python3
VENV    ?= .venv
SHARED  ?= $(abspath ../shared)
export REIDX_MODEL_DIR ?= $(SHARED)/models
export REIDX_SHARED ?= $(SHARED)
BIN := $(VENV)/bin

.PHONY: test-accuracy demo test venv chromium clean

# torch is pinned first so a CPU machine takes the CPU wheel and never pulls CUDA packages;
# the project's own range (torch>=2.3) is then already satisfied.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test,onnx]'
	touch $@

venv: $(BIN)/.installed

# The main job on the demo data: evaluate the embedder on the Con-ReID split, run the nightly
# job (index the demo manifests -- crops, full frames and the street video -- into
# out/demo-gallery, then build its Faiss index; a rerun adds nothing), export the video's
# detections with their frame, time and track, then ask where the two demo query crops appear:
# ranked Parquet + HTML report.
demo: venv
	$(BIN)/reidx evaluate \
	    --query $(SHARED)/data/con-reid/query \
	    --gallery $(SHARED)/data/con-reid/bounding_box_test \
	    --weights osnet_x0_25_msmt17
	$(BIN)/reidx nightly data_manifests/con-reid.toml data_manifests/scenes.toml data_manifests/video.toml \
	    --out out/demo-gallery
	$(BIN)/reidx ledger out/demo-gallery
	$(BIN)/reidx export out/demo-gallery --where "track_id IS NOT NULL" \
	    --columns member,frame_index,timestamp,track_id,x1,y1,x2,y2,score --out out/demo-video-tracks.parquet
	$(BIN)/reidx query out/demo-gallery $(SHARED)/data/scenes/queries --top-k 20 \
	    --out out/demo-results.parquet --report out/demo-report.html --trajectory

# tests/test_report_browser.py opens the report in a real headless Chromium (Debian's package;
# installed here when missing, as root — CI runs as root; elsewhere install it or set $$CHROMIUM).
chromium:
	[ -n "$$CHROMIUM" ] || command -v chromium >/dev/null 2>&1 || { apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# CI's suite: everything but the `slow` accuracy group (~15 min on 2 quiet cores)
test: venv chromium
	$(BIN)/python -m pytest -q -m "not slow"

# the accuracy group: re-ranking and reference figures on the full splits, both weights (~7 min more)
test-accuracy: venv
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
