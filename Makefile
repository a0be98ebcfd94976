# Two commands matter: `make demo` and `make test`. Each installs what is missing first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines: pin this torch so pip never pulls a multi-GB CUDA build. A GPU user installs their own first.
TORCH ?= torch==2.13.0

.PHONY: install demo test bench sshd clean

$(BIN)/edgeft: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	# Name the installed torch so no dependency (litert-torch included) can swap it for another build.
	$(BIN)/pip install -q -e ".[dev,tflite]" "torch==$$($(BIN)/python -c 'import torch; print(torch.__version__)')"
	touch $(BIN)/edgeft

install: $(BIN)/edgeft

# The tests run a real OpenSSH server on 127.0.0.1; install it when missing (Debian/Ubuntu, as root).
sshd:
	@test -x /usr/sbin/sshd || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client >/dev/null; }

demo: install
	$(BIN)/edgeft build --target rpi5 --device local

test: install sshd
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/bench_build.py

clean:
	rm -rf build
