"""Fuzzers of the delegate: options_fuzzer.cc (libFuzzer) and models.py (hostile models)."""
