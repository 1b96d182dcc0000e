//! Who may do what: Lighter's access control, shared by the data plane and the control plane.
//!
//! One place says yes ([`policy::Policy::allows`] and [`token::Verified::allows`]): the control
//! plane asks it for every request it serves and when it issues tokens; the data plane asks it
//! for pulls, with a per-core cache of verified tokens ([`cache::TokenCache`]) so that an
//! authorised pull costs a lookup, not a signature check.
//!
//! - [`config`]: the `[auth]` section of the configuration (rules, identities, tokens).
//! - [`policy`]: rules per repository prefix (longest match wins) granting actions to
//!   principals (`anonymous`, `authenticated`, `user:`, `group:`, `serviceaccount:`,
//!   `namespace:`); pure.
//! - [`token`]: the JWTs of the Docker/OCI token flow: Lighter's own (Ed25519, signed by the
//!   control plane) and those of configured external issuers; claims, verification, signing.
//! - [`cache`]: the data plane's per-core cache of verified tokens.

pub mod cache;
pub mod config;
pub mod policy;
pub mod token;

pub use config::AuthConfig;
pub use policy::{Action, Actions, Identity, Policy, Who};
pub use token::{Verified, Verifier};
