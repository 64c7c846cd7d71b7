//! Operations a client does against a cluster's store: the CLI's `plugin push` and
//! `register`, and the admin API's module upload, share them.

pub mod push;
pub mod register;

pub use push::{PushSettings, Pushed, push_plugin};
pub use register::register;
