//! Test and benchmark support, not part of the daemon: the guest side of a
//! ring ([`driver`], for the integration tests and the benchmark, behind the
//! `test-utils` feature) and unit-test helpers ([`unit`]).

pub mod driver;
#[cfg(test)]
pub mod unit;
