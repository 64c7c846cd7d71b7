//! Weir's integration tests: one binary, so that it links once.

mod adversarial;
mod authoring;
mod balancing;
mod child;
mod etcd;
mod languages;
mod observability;
mod plugins;
mod reload;
mod routing;
mod sandbox;
mod tenants;
