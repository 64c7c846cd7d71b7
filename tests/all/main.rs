//! Weir's integration tests: one binary, so that it links once.

mod adversarial;
mod balancing;
mod child;
mod etcd;
mod observability;
mod plugins;
mod reload;
mod routing;
mod sandbox;
mod tenants;
