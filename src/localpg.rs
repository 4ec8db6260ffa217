//! Throwaway local PostgreSQL clusters for `walbridge demo`, the tests and the benchmarks.
