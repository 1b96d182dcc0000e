//! Access control on the pull path. The data plane answers a pull itself only when it is
//! allowed: anonymously by the rules (and `anonymous_cidrs`), or by a Bearer token that grants
//! `pull` on the repository. Everything else (no or wrong credentials, Basic credentials, a
//! token for another scope) is handed to the control plane, which words the 401, 403 or 429
//! and counts failures. Tokens are verified once per core and then found in
//! [`lighter_access::cache::TokenCache`]: an authorised pull is a lookup, with no allocation.

use std::cell::{Cell, RefCell};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use lighter_access::cache::{Lookup, TokenCache};
use lighter_access::{Action, Policy, Verifier, Who};

/// What both planes need to check access (built by the control plane's configuration).
#[derive(Clone, Debug)]
pub struct AuthSetup {
    pub config: lighter_access::AuthConfig,
    /// Lighter's own token key (configured, or in the data directory).
    pub own_key_path: std::path::PathBuf,
}

/// How often a core looks again for Lighter's own token key while it is missing.
const KEY_RETRY: Duration = Duration::from_secs(1);

/// One core's access checks.
pub struct Access {
    policy: Policy,
    verifier: RefCell<Verifier>,
    own_key_loaded: Cell<bool>,
    next_key_load: Cell<Instant>,
    tokens: RefCell<TokenCache>,
}

impl Access {
    pub fn new(setup: &AuthSetup) -> Result<Access, String> {
        let mut verifier = Verifier::new(&setup.config, &setup.own_key_path)?;
        let loaded = verifier.load_own_key();
        Ok(Access {
            policy: Policy::new(&setup.config)?.ok_or("access control needs [[auth.rules]]")?,
            verifier: RefCell::new(verifier),
            own_key_loaded: Cell::new(loaded),
            next_key_load: Cell::new(Instant::now()),
            tokens: RefCell::new(TokenCache::new(setup.config.token_cache_entries)),
        })
    }

    /// Whether the data plane needs each client's address (`anonymous_cidrs` is set).
    pub fn wants_peer_address(&self) -> bool {
        self.policy.limits_anonymous()
    }

    /// Whether a request with `authorization` (the header's value, if any) from `peer` may pull
    /// `name` (a local repository name); for `None`, whether it carries a valid token at all
    /// (`/v2/`, which tells clients whether their credentials work). A valid token's subject
    /// goes to `identity` (borrowed from the cache: the caller copies it, nothing allocates).
    pub fn may_pull(
        &self,
        authorization: Option<&[u8]>,
        peer: Option<IpAddr>,
        name: Option<&str>,
        now: Instant,
        identity: impl FnOnce(&str),
    ) -> bool {
        let Some(value) = authorization else {
            return name.is_some_and(|n| self.policy.allows(Who::Anonymous, peer, n, Action::Pull));
        };
        let Some(token) = lighter_access::token::bearer(value) else {
            return false;
        };
        if !self.own_key_loaded.get() && now >= self.next_key_load.get() {
            self.next_key_load.set(now + KEY_RETRY);
            self.own_key_loaded
                .set(self.verifier.borrow_mut().load_own_key());
        }
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let verifier = self.verifier.borrow();
        let mut tokens = self.tokens.borrow_mut();
        match tokens.get(&verifier, token, unix) {
            // A token's holder may do at least what anyone may.
            Lookup::Valid(v) => {
                identity(&v.subject);
                name.is_none_or(|n| {
                    v.allows(n, Action::Pull)
                        || self.policy.allows(Who::Anonymous, peer, n, Action::Pull)
                })
            }
            Lookup::Invalid(_) => false,
        }
    }
}
