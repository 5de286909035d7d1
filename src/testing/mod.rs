//! Test and benchmark support, not part of the daemon: the guest side of a
//! ring ([`driver`], for the integration tests and the benchmark, behind the
//! `test-utils` feature), a recording stand-in for the tap's control
//! ([`tap`]) and unit-test helpers ([`unit`]).

pub mod driver;
pub mod tap;
#[cfg(test)]
pub mod unit;
