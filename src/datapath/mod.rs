//! The data path: one worker per queue pair ([`queue_pair`]) running
//! batches ([`batch`]) of RX and TX steps ([`rx`], [`tx`]) over guest memory
//! ([`guest`]), with one interrupt decision per batch ([`notify`]) on the
//! framework's vrings ([`vring`]). Knows rings and frames; reaches the
//! kernel only through [`crate::host`].

pub mod batch;
pub mod dirty;
pub mod guest;
pub mod notify;
pub mod queue_pair;
pub mod rx;
pub mod tx;
pub mod vring;

#[cfg(test)]
mod proptests;
