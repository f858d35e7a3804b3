"""The benchmark suite: `m2mkd-fast bench [ops|step|all]` (see m2mkd_fast.bench.suite)."""
