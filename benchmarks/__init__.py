"""Benchmarks: each module measures one area beside its reference and writes its section of docs/benchmarks.md."""
