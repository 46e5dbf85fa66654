# Two commands: `make demo` (the main job end to end) and `make test` (the suite).
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-quick model-unet-obnlm model-unet-sim model-voxelmorph clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/us3d demo demo-output
	@echo "Open demo-output/report.md"

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)  # every benchmark: benchmarks/RESULTS.md and the section reports with their figures
	$(BIN)/python benchmarks/run_all.py

bench-quick: $(STAMP)  # writes into benchmarks/output/, leaving the committed reports alone
	$(BIN)/python benchmarks/run_all.py --quick --outdir benchmarks/output

# The bundled U-Nets, one command each (see their model cards for the run times; no GPU). Each writes the .pt,
# its model card (.md), the training log (.log.jsonl) and the manifest entry in Resources/Models/. unet-sim was
# trained side by side with an earlier unet-obnlm on a 2-core machine, one CPU thread each; unet-obnlm (in-plane
# kernels, 4200 steps: its loss still fell after 2800) alone on the 2 cores.
UNET_TRAINING := --standard 8 --varied 48 --batch-size 4 --seed 0 --cache .cache/training

model-unet-obnlm: $(STAMP)
	NUMBA_NUM_THREADS=1 $(BIN)/us3d train-despeckle Resources/Models/unet-obnlm.pt --target obnlm $(UNET_TRAINING) --steps 4200 --threads 2

model-unet-sim: $(STAMP)
	NUMBA_NUM_THREADS=1 $(BIN)/us3d train-despeckle Resources/Models/unet-sim.pt --target clean $(UNET_TRAINING) --steps 2800 --threads 1

# The bundled VoxelMorph model, trained on original, OBNLM and U-Net inputs alike, on standard and varied
# simulated breathing (see its model card): simulating and pre-processing the sequences into the cache takes
# about 25 min on 2 cores, training 93 min (2 threads, no GPU; 2400 steps of batch 2 at about 2.3 s).
model-voxelmorph: $(STAMP)
	$(BIN)/us3d train-register Resources/Models/voxelmorph.pt --inputs none obnlm unet --frames 8 \
		--steps 2400 --batch-size 2 --threads 2 --seed 0 --cache .cache/registration

clean:
	rm -rf $(VENV) demo-output
