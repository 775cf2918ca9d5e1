# Convenience wrappers around ./dev.sh (which needs no make: fresh Debian has none).
.PHONY: setup lab test lint proto bench
setup: ; ./dev.sh setup
lab: ; ./dev.sh lab
test: ; ./dev.sh test
lint: ; ./dev.sh lint
proto: ; .venv/bin/python -m fabric.control.protogen
bench: ; .venv/bin/fabric-tool bench --repeat 3 --json bench.json --markdown BENCHMARKS.md
