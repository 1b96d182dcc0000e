//! Subcommands that query a running registry.

pub mod outdated;
