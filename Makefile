# lightning_mim: `make demo` and `make test` set up everything they need on a fresh Debian machine with Python 3.11.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST_DEB_DIR := .data/fashion-mnist
RUN ?= runs

.PHONY: install data demo test bench tensorboard clean reproduce-lut reproduce-symmim reproduce-all \
	reproduce-mapet reproduce-beyond-masking compare

install: $(STAMP) data

# One pip request with the exact pins, torch and torchvision together (see constraints.txt).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,tokenizers,jpeg,robustness]' -c constraints.txt
	@# OpenCV (imported by imagecorruptions, the robustness protocol) loads libGL.so.1 and libgthread-2.0
	@$(BIN)/python -c "import cv2" 2>/dev/null || { \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	        (apt-get update -qq && apt-get install -y -qq libgl1 libglib2.0-0) >/dev/null; \
	    else echo "OpenCV cannot load: install its system libraries: sudo apt-get install libgl1 libglib2.0-0"; fi; }
	touch $(STAMP)

# Fashion-MNIST, the default data, from the Debian package dataset-fashion-mnist: installed system-wide when apt can
# (root or password-less sudo), otherwise unpacked into .data/ without root.
data:
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || \
	    [ -f $(FMNIST_DEB_DIR)/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null; \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
	    (sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist) >/dev/null; \
	elif command -v apt-get >/dev/null; then \
	    mkdir -p $(FMNIST_DEB_DIR) && cd $(FMNIST_DEB_DIR) && apt-get download dataset-fashion-mnist >/dev/null && \
	    dpkg-deb -x dataset-fashion-mnist_*.deb . ; \
	else \
	    echo "Fashion-MNIST not found. Install the Debian package: sudo apt-get install dataset-fashion-mnist"; \
	    echo "or pass --data.data_dir DIR holding {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz"; \
	fi

demo: install
	$(BIN)/lightning-mim demo

test: install
	$(BIN)/python -m pytest

# Train-step throughput, memory, FLOPs, data-pipeline and shard-writing speed (benchmarks/README.md; GPU commands there)
bench: install
	$(BIN)/python -m benchmarks.bench --methods all --size small --img-size 224 --patch-size 16 --batch 32 \
	    --steps 5 --warmup 2 --data imagefolder,webdataset --workers 1 --shard-workers 1,2 --device cpu \
	    --out benchmarks/results/cpu_vit_s16

# A paper's table rows (pre-training, then `lightning-mim evaluate`) and its table in runs/reproduce/<preset>/<paper>/;
# `compare`: every method under one budget and one evaluation, table and plot in runs/reproduce/<preset>/compare/.
# The runs themselves are shared by every table of a preset (runs/reproduce/<preset>/<row>/).
# PRESET=smoke|demo|gpu|paper (default: paper when DATA is given, else demo; gpu: the demo rows on one GPU in bf16
# with fine-tuning, budgets not yet checked on a GPU, see docs/reproduce.md), DATA=, GPUS= (per node), NODES=, SLURM=1,
# DRY_RUN=1 (print the commands only), ROWS=a,b, FIT_ARGS= / EVAL_ARGS= (more fit / evaluate arguments), STEPS=
# (the demo / gpu budget, default 300 / 3000), JOBS= (rows at once, default 1; with PRESET=gpu on one GPU), SEEDS=
# (runs of every row, seeded 0..SEEDS-1: tables give mean, std and n, and each paper claim's verdict; default 1,
# 3 with PRESET=gpu), EPOCHS= (compare's budget at paper scale),
# CPUS_PER_GPU= (SLURM=1: --cpus-per-task of every job; default: the nodes' CPUs per GPU from sinfo, else 10),
# TRANSFER_DATA=name=folder,... (reproduce targets, PRESET=paper: every MAE / LUT pre-training also fine-tuned on each
# ImageFolder, e.g. inat2018=/data/inat2018,cub200=/data/cub200; a column per set), SHIFT_DATA=name=folder,...
# (PRESET=paper: every fine-tuned row also scored on each shift set, e.g. imagenet-a=/data/imagenet-a; a column per
# set, beside MAE's reported ImageNet-A / -R / -Sketch numbers in LUT's table). Unset ones take the driver's
# defaults (`lightning-mim reproduce --help`).
REPRODUCE_ARGS = $(if $(PRESET),--preset $(PRESET)) $(if $(DATA),--data '$(DATA)') $(if $(GPUS),--gpus $(GPUS)) \
	$(if $(NODES),--nodes $(NODES)) $(if $(filter 1,$(SLURM)),--slurm) $(if $(filter 1,$(DRY_RUN)),--dry-run) \
	$(if $(ROWS),--rows $(ROWS)) $(if $(FIT_ARGS),--fit-args='$(FIT_ARGS)') $(if $(EVAL_ARGS),--eval-args='$(EVAL_ARGS)') \
	$(if $(STEPS),--steps $(STEPS)) $(if $(JOBS),--jobs $(JOBS)) $(if $(SEEDS),--seeds $(SEEDS)) \
	$(if $(CPUS_PER_GPU),--cpus-per-gpu $(CPUS_PER_GPU)) $(if $(SHIFT_DATA),--shift-data '$(SHIFT_DATA)')

TRANSFER_ARGS = $(if $(TRANSFER_DATA),--transfer-data '$(TRANSFER_DATA)')

reproduce-lut reproduce-symmim reproduce-mapet reproduce-all: install
	$(BIN)/lightning-mim reproduce $(@:reproduce-%=%) $(REPRODUCE_ARGS) $(TRANSFER_ARGS)

reproduce-beyond-masking: install
	$(BIN)/lightning-mim reproduce beyond_masking $(REPRODUCE_ARGS) $(TRANSFER_ARGS)

compare: install
	$(BIN)/lightning-mim compare $(REPRODUCE_ARGS) $(if $(EPOCHS),--epochs $(EPOCHS))

tensorboard: install
	$(BIN)/tensorboard --logdir $(RUN)

clean:
	rm -rf $(VENV) .data runs *.egg-info

# The lowest declared versions (constraints-min.txt) in their own venv, and a fast subset of the tests: the backbone,
# every method's step through a CLI fit, exact resume, webdataset shards, export and the linear probe
# (docs/maintainers.md). `make test` stays on the tested set of constraints.txt.
.PHONY: test-min
VENV_MIN := .venv-min
TEST_MIN := tests/test_backbone.py tests/test_eval_linear.py \
	"tests/test_cli.py::test_fit_logs_common_tags_and_loss_decreases" \
	"tests/test_lut.py::test_cli_fit_logs_the_shared_tags" \
	"tests/reliability/test_resume.py::test_sigkill_then_resume_matches_straight_run[MAE]" \
	"tests/reliability/test_resume.py::test_sigkill_then_resume_matches_straight_run[SymMIM]" \
	"tests/reliability/test_resume.py::test_sigkill_then_resume_matches_straight_run[LUT]" \
	"tests/reliability/test_resume.py::test_train_loader_resumes_mid_epoch_with_the_unseen_batches" \
	"tests/test_data.py::test_shard_writer_round_trip" "tests/test_data.py::test_webdataset_loader_in_a_lightning_fit" \
	"tests/test_eval_weights.py::test_export_round_trips_bit_exactly_into_timm"

$(VENV_MIN)/.installed: pyproject.toml constraints-min.txt
	$(PYTHON) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/pip install --quiet --upgrade pip
	$(VENV_MIN)/bin/pip install --quiet -e '.[dev]' -c constraints-min.txt
	touch $@

test-min: $(VENV_MIN)/.installed
	$(VENV_MIN)/bin/python -m pip list --format=freeze | grep -iE '^(torch|torchvision|timm|lightning|torchmetrics|jsonargparse|tensorboard|webdataset|torchdata|safetensors|numpy)=='
	$(VENV_MIN)/bin/python -m pytest $(TEST_MIN)
