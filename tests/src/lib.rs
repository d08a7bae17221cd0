//! `bulkhead-tests`: end-to-end tests across processes — real clients against
//! the `bulkhead` binary, eBPF enforcement in network namespaces the tests
//! create, fairness under load. The tests live in `tests/tests/`; this
//! library will hold what they share (spawning the binary, minting test
//! certificates, namespaces). None exist yet: the crates they exercise land
//! with the front door and the kernel data plane.

#![forbid(unsafe_code)]
