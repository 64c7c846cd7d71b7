//! Weir's integration tests: one binary, so that it links once.

mod balancing;
mod etcd;
mod observability;
mod plugins;
mod reload;
mod routing;
mod sandbox;
