# Convenience targets. The test command of record is `bash .ci/run` (see README.md).

PYTHON ?= python3
PYINSTALLER ?= pyinstaller

.PHONY: binary test test-deploy bench-binary lint-docker clean

## binary: build the one-file executable dist/comfy-sidecar from build.spec (needs the dev extra)
binary:
	$(PYINSTALLER) --noconfirm --clean build.spec
	@ls -l dist/comfy-sidecar
	@./dist/comfy-sidecar --version

## test: the whole test suite, as CI runs it
test:
	bash .ci/run

## test-deploy: only the deployment checks (hadolint, Kubernetes schemas, Salad example, binary)
test-deploy:
	$(PYTHON) -m pytest -q tests/deploy

## bench-binary: size, exec -> first /health answer, idle RSS and SIGTERM figures for the binary
bench-binary: dist/comfy-sidecar
	$(PYTHON) bench/binary_startup.py --binary dist/comfy-sidecar

## lint-docker: hadolint every Dockerfile under docker/
lint-docker:
	hadolint docker/*.Dockerfile

dist/comfy-sidecar:
	$(MAKE) binary

clean:
	rm -rf build dist
