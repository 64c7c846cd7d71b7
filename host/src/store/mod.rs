//! Config stores: where the gateway's config objects come from.

pub mod file;
