# Two commands matter: `make demo` and `make test`. Each installs what is missing first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines: pin this torch so pip never pulls a multi-GB CUDA build. A GPU user installs their own first.
TORCH ?= torch==2.13.0

.PHONY: install demo test bench sysdeps clean

$(BIN)/edgeft: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	# Name the installed torch so no dependency (litert-torch included) can swap it for another build.
	$(BIN)/pip install -q -e ".[dev,tflite]" "torch==$$($(BIN)/python -c 'import torch; print(torch.__version__)')"
	touch $(BIN)/edgeft

install: $(BIN)/edgeft

# The tests run real OpenSSH servers on 127.0.0.1, an emulated ARM64 board (qemu-user + debootstrap),
# headless Chromium (the HTML report) and the real Mender client and artifact tool (edgeft mender);
# install what is missing (Debian/Ubuntu, as root).
SYSDEPS := /usr/sbin/sshd /usr/bin/qemu-aarch64-static /usr/sbin/debootstrap /usr/sbin/update-binfmts /usr/bin/chromium \
	/usr/bin/mender /usr/bin/mender-artifact
sysdeps:
	@for f in $(SYSDEPS); do test -x $$f || missing=1; done; test -z "$$missing" || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client qemu-user-static debootstrap binfmt-support chromium \
	  mender-client mender-artifact >/dev/null; }

demo: install
	$(BIN)/edgeft build --target rpi5 --device local

test: install sysdeps
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/bench_build.py

clean:
	rm -rf build
