//! `bulkhead-tests`: end-to-end tests across processes — real clients against
//! the `bulkhead` binary, eBPF enforcement in network namespaces the tests
//! create, fairness under load. The tests live in `tests/tests/`; this
//! library holds what they share.

#![forbid(unsafe_code)]

pub mod netns;
