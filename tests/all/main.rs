//! Weir's integration tests: one binary, so that it links once.

mod admin;
mod admin_plane;
mod adversarial;
mod auth;
mod authoring;
mod balancing;
mod chaos;
mod cluster_limits;
mod consumers;
mod dashboard;
mod drain;
mod edge;
mod etcd;
mod grpc;
mod languages;
mod module_cache;
mod observability;
mod plugins;
mod reload;
mod resilience;
mod routing;
mod sandbox;
mod signing;
mod tenants;
mod tls;
mod websocket;
