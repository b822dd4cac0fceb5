# visionloop — one entry point. `make demo` and `make test` are the README's quick start.
SHELL := /bin/bash
VENV ?= $(or $(VL_VENV),$(HOME)/.local/share/visionloop/venv)
VL := $(VENV)/bin/visionloop

.PHONY: help setup demo demo-quick smoke up test test-slow test-long test-all doors contracts contracts-check bench-bus compose-check clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 18

setup:  ## create or reuse the environment and install this checkout
	@./scripts/setup.sh >/dev/null

demo: setup  ## set up and run the whole loop in three rounds on the embedded stack; writes a report
	$(VL) demo

demo-quick: setup  ## the small demo (3 to 11 minutes on 2 vCPU, by machine)
	$(VL) demo --quick

smoke: setup  ## start the embedded stack, push one sample image through, stop
	$(VL) up --smoke

up: setup  ## set up and run every service on the embedded stack until Ctrl-C
	$(VL) up

test:  ## set up and run the test suite without the slow and long tests (7-14 minutes on 2 vCPU)
	./scripts/test.sh -m "not slow and not long"

test-slow:  ## the slow real-stack tests (training runs, a canary rollback); CI runs them after `make test`
	./scripts/test.sh -m slow

test-long:  ## the quick demo, the benches, reduced chaos, `up` with processes (about 33 minutes on a slow 2 vCPU; not in CI)
	./scripts/test.sh -m long

test-all:  ## every test in one run
	./scripts/test.sh

DOORS := ingest_hostile ingest_http ingest_inspect ingest_sources ingest_policy security fuzz_http fuzz_events \
	gateway_http gateway_labelstudio edge_agent blob acls contract_minimal

doors:  ## the hostile-input and authentication tests (docs/security.md), one summary line
	VL_DOORS_SUMMARY=1 ./scripts/test.sh -q -p no:cacheprovider $(foreach t,$(DOORS),tests/test_$(t).py)

contracts: setup  ## regenerate contracts/schemas/*.json and contracts/asyncapi.yaml
	$(VL) contracts export

contracts-check: setup  ## fail on a non-additive contract change or a stale AsyncAPI document
	$(VL) contracts check

bench-bus: setup  ## bus round-trip benchmark (results: docs/benchmarks.md)
	$(VL) bench bus

compose-check:  ## validate compose.yaml offline (Debian's docker-compose)
	docker-compose -f compose.yaml config -q

clean:  ## remove the project-local state (embedded PostgreSQL data, blobs, logs)
	rm -rf .visionloop
