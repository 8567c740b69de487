"""Scale benchmarks for nlsstream (see benchmarks/README.md)."""
