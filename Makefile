# Convenience targets. ARGS is passed through, e.g. `make bench ARGS=--quick`.
ARGS ?=

.PHONY: bench
bench:
	bash scripts/bench-compare.sh $(ARGS)
