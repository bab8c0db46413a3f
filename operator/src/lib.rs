//! The wasmfilter operator, library part.
//!
//! - [`index`]: which filters each dataplane runs and how each rollout stands (pure).
//! - [`control`]: the shared control-plane state the controller and the gRPC layer meet in.
//! - [`grpc`]: the FilterDiscovery service dataplanes connect to.
//! - [`controller`]: the WasmFilter controller (resolve, publish, status, Events).
//! - [`admin`]: `/live`, `/ready` and `/metrics`.
//! - [`leader`]: Lease-based leader election.
//! - [`watch`]: the WasmFilter list-watch, decoding each object on its own.
//! - [`run`]: `wasmfilter-operator run`, all of the above wired together ([`run::Operator`]).
//! - Module resolution, the module cache and registry credentials live in `wasmfilter-oci`
//!   (the dataplane uses them too) and are re-exported here.

pub mod admin;
pub mod control;
pub mod controller;
pub mod grpc;
pub mod index;
pub mod leader;
pub mod run;
pub mod watch;

pub use wasmfilter_oci::*;
