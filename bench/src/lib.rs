//! Benchmarks live in benches/; see README.md (what each one measures, how to run, results).
