# The two commands a newcomer needs (see README.md):
#   make demo   set everything up, start the platform, stream a generation through an adapter
#   make test   set everything up and run all tests (unit + integration on real Ray Serve / vLLM)

PY := .venv/bin/python

.PHONY: install install-k8s demo test unit integration protos bench

install:
	bash scripts/install.sh

# kube-apiserver, etcd and helm for the chart and controller tests (built once per machine)
install-k8s:
	bash scripts/install_k8s.sh

demo: install
	bash scripts/demo.sh

# The Kubernetes tools build (CPU-bound, once per machine) beside the Python install
# (mostly downloads), so that on a fresh machine the two overlap.
test:
	@bash scripts/install_k8s.sh & k8s=$$!; bash scripts/install.sh && wait $$k8s
	$(PY) -m pytest -q tests

unit: install
	$(PY) -m pytest -q tests/unit

integration: install install-k8s
	$(PY) -m pytest -q tests/integration

protos: install
	$(PY) scripts/gen_protos.py

bench: install
	$(PY) benchmarks/generation.py
