# himoe-plugin: one-command environment, main job and tests (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
ENV_STAMP := $(VENV)/.himoe-env-ready
DEMO_ITERS ?= 300
DEMO_OUT ?= output/demo_himoe_aquarium

.PHONY: env test demo

env: $(ENV_STAMP)

$(ENV_STAMP): tools/env/setup_env.sh tools/env/requirements-stack.txt tools/env/patch_detectron2.py setup.py
	bash tools/env/setup_env.sh
	touch $@

# Run the whole test suite (CPU, real data from ../shared/data or $$HIMOE_DATA_ROOT).
test: env
	$(PY) -m pytest tests

# Main job: train HI-MoE Faster R-CNN R18-FPN on Aquarium train, evaluate COCO AP on Aquarium valid.
demo: env
	$(PY) tools/train_net.py \
		--config-file configs/detectron2/aquarium/himoe_faster_rcnn_R_18_FPN_aquarium.yaml \
		SOLVER.MAX_ITER $(DEMO_ITERS) SOLVER.STEPS "($$(( $(DEMO_ITERS) * 3 / 4 )),)" \
		SOLVER.WARMUP_ITERS $$(( $(DEMO_ITERS) / 10 )) SOLVER.CHECKPOINT_PERIOD $(DEMO_ITERS) \
		OUTPUT_DIR $(DEMO_OUT)
