//! Rules per repository prefix granting actions to principals. Pure: no I/O, and the checks the
//! data plane makes per request ([`Policy::allows`] for anonymous pulls) allocate nothing.

use std::net::IpAddr;

use crate::config::AuthConfig;

/// What a request does to a repository (or to one of Lighter's own endpoints, `admin`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Pull,
    Push,
    Delete,
    Admin,
}

impl Action {
    pub const ALL: [Action; 4] = [Action::Pull, Action::Push, Action::Delete, Action::Admin];

    pub fn word(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
            Action::Admin => "admin",
        }
    }

    pub fn from_word(w: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.word() == w)
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A set of actions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Actions(u8);

impl Actions {
    pub const NONE: Actions = Actions(0);

    pub fn with(self, a: Action) -> Actions {
        Actions(self.0 | a.bit())
    }

    pub fn has(self, a: Action) -> bool {
        self.0 & a.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn intersect(self, other: Actions) -> Actions {
        Actions(self.0 & other.0)
    }

    pub fn iter(self) -> impl Iterator<Item = Action> {
        Action::ALL.into_iter().filter(move |a| self.has(*a))
    }

    /// `pull,push` (the token flow's spelling), in a fixed order.
    pub fn words(self) -> Vec<&'static str> {
        self.iter().map(Action::word).collect()
    }
}

/// Who a rule grants to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// Everyone: requests without credentials (from `anonymous_cidrs`, when set) and every
    /// authenticated caller.
    Anonymous,
    /// Every authenticated caller.
    Authenticated,
    User(String),
    Group(String),
    ServiceAccount {
        namespace: String,
        name: String,
    },
    /// Every ServiceAccount of a namespace.
    Namespace(String),
}

impl Principal {
    pub fn parse(s: &str) -> Result<Principal, String> {
        let nonempty = |v: &str, what: &str| {
            if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
                Err(format!("{s:?}: empty or blank {what}"))
            } else {
                Ok(v.to_owned())
            }
        };
        match s.split_once(':') {
            None if s == "anonymous" => Ok(Principal::Anonymous),
            None if s == "authenticated" => Ok(Principal::Authenticated),
            Some(("user", u)) => Ok(Principal::User(nonempty(u, "user name")?)),
            Some(("group", g)) => Ok(Principal::Group(nonempty(g, "group name")?)),
            Some(("namespace", n)) => Ok(Principal::Namespace(nonempty(n, "namespace")?)),
            Some(("serviceaccount", rest)) => match rest.split_once(':') {
                Some((ns, name)) if !name.contains(':') => Ok(Principal::ServiceAccount {
                    namespace: nonempty(ns, "namespace")?,
                    name: nonempty(name, "ServiceAccount name")?,
                }),
                _ => Err(format!("{s:?}: expected serviceaccount:<namespace>:<name>")),
            },
            _ => Err(format!(
                "{s:?}: expected anonymous, authenticated, user:<name>, group:<name>, \
                 serviceaccount:<namespace>:<name> or namespace:<namespace>"
            )),
        }
    }

    fn matches(&self, who: &Who, anonymous_here: bool) -> bool {
        match (self, who) {
            (Principal::Anonymous, Who::Anonymous) => anonymous_here,
            (Principal::Anonymous, Who::User(_)) => true,
            (Principal::Authenticated, Who::User(_)) => true,
            (Principal::User(u), Who::User(id)) => id.user == *u,
            (Principal::Group(g), Who::User(id)) => id.groups.iter().any(|x| x == g),
            (Principal::ServiceAccount { namespace, name }, Who::User(id)) => {
                id.service_account() == Some((namespace, name))
            }
            (Principal::Namespace(ns), Who::User(id)) => {
                id.service_account().is_some_and(|(n, _)| n == ns)
            }
            _ => false,
        }
    }
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// An htpasswd user, `system:serviceaccount:<namespace>:<name>` for a ServiceAccount, or
    /// the subject of an external issuer's token.
    pub user: String,
    /// htpasswd groups, or the Kubernetes groups TokenReview reports.
    pub groups: Vec<String>,
}

impl Identity {
    /// `(namespace, name)` when this is a Kubernetes ServiceAccount.
    pub fn service_account(&self) -> Option<(&str, &str)> {
        let rest = self.user.strip_prefix("system:serviceaccount:")?;
        rest.split_once(':')
            .filter(|(ns, n)| !ns.is_empty() && !n.is_empty())
    }
}

/// The caller of one request.
#[derive(Clone, Copy, Debug)]
pub enum Who<'a> {
    Anonymous,
    User(&'a Identity),
}

#[derive(Clone, Debug)]
struct Rule {
    prefix: String,
    /// Indexed by `Action as usize`.
    grants: [Vec<Principal>; 4],
}

/// The compiled `[[auth.rules]]`.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Longest prefix first.
    rules: Vec<Rule>,
    anonymous_cidrs: Vec<ipnet::IpNet>,
}

impl Policy {
    /// None when access control is off (no rules).
    pub fn new(c: &AuthConfig) -> Result<Option<Policy>, String> {
        if !c.enabled() {
            return Ok(None);
        }
        let mut rules = Vec::with_capacity(c.rules.len());
        for r in &c.rules {
            check_prefix(&r.prefix)?;
            let parse = |list: &[String]| -> Result<Vec<Principal>, String> {
                list.iter()
                    .map(|p| {
                        Principal::parse(p).map_err(|e| format!("auth rule {:?}: {e}", r.prefix))
                    })
                    .collect()
            };
            let norm = r.prefix.trim_end_matches('/').to_owned();
            if rules.iter().any(|x: &Rule| x.prefix == norm) {
                return Err(format!(
                    "auth rules: prefix {:?} appears twice: merge the two rules",
                    r.prefix
                ));
            }
            rules.push(Rule {
                prefix: norm,
                grants: [
                    parse(&r.pull)?,
                    parse(&r.push)?,
                    parse(&r.delete)?,
                    parse(&r.admin)?,
                ],
            });
        }
        rules.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        let anonymous_cidrs = c
            .anonymous_cidrs
            .iter()
            .map(|s| parse_cidr(s))
            .collect::<Result<_, _>>()?;
        Ok(Some(Policy {
            rules,
            anonymous_cidrs,
        }))
    }

    /// Whether `who`, connecting from `ip`, may do `action` on `name`. `name` is a repository
    /// (for a mirror, the local name: `docker.io/library/nginx`) or one of Lighter's endpoints
    /// (`_lighter/metrics`). Allocates nothing.
    pub fn allows(&self, who: Who, ip: Option<IpAddr>, name: &str, action: Action) -> bool {
        let Some(rule) = self.rules.iter().find(|r| prefix_matches(name, &r.prefix)) else {
            return false;
        };
        let anonymous_here = self.anonymous_from(ip);
        rule.grants[action as usize]
            .iter()
            .any(|p| p.matches(&who, anonymous_here))
    }

    /// The actions of `wanted` that `who` may do on `name`.
    pub fn granted(&self, who: Who, ip: Option<IpAddr>, name: &str, wanted: Actions) -> Actions {
        wanted
            .iter()
            .filter(|a| self.allows(who, ip, name, *a))
            .fold(Actions::NONE, Actions::with)
    }

    /// Whether a request without credentials from `ip` counts as `anonymous`.
    pub fn anonymous_from(&self, ip: Option<IpAddr>) -> bool {
        if self.anonymous_cidrs.is_empty() {
            return true;
        }
        let Some(ip) = ip else { return false };
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.anonymous_cidrs.iter().any(|n| n.contains(&ip))
    }

    /// Whether `anonymous_cidrs` is set (the data plane then needs each client's address).
    pub fn limits_anonymous(&self) -> bool {
        !self.anonymous_cidrs.is_empty()
    }
}

/// `name` starts with `prefix` (stored without a trailing `/`) at a component boundary.
fn prefix_matches(name: &str, prefix: &str) -> bool {
    prefix.is_empty()
        || (name.starts_with(prefix)
            && matches!(name.as_bytes().get(prefix.len()), None | Some(b'/')))
}

fn check_prefix(p: &str) -> Result<(), String> {
    let ok = p.bytes().all(|b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'/' | b'.' | b'_' | b'-')
    }) && !p.starts_with('/')
        && !p.contains("//")
        && !p.split('/').any(|c| c == ".." || c == ".");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "auth rule prefix {p:?}: expected a repository name or a prefix of one \
             (lowercase letters, digits, . _ - and /), or \"\" for everything"
        ))
    }
}

fn parse_cidr(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("auth.anonymous_cidrs: {s:?} is not a CIDR (198.18.0.0/15, fd00::/8)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RuleConfig;

    fn rule(prefix: &str, pull: &[&str], push: &[&str]) -> RuleConfig {
        RuleConfig {
            prefix: prefix.into(),
            pull: pull.iter().map(|s| s.to_string()).collect(),
            push: push.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn policy(rules: Vec<RuleConfig>, cidrs: &[&str]) -> Policy {
        Policy::new(&AuthConfig {
            rules,
            anonymous_cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .unwrap()
        .unwrap()
    }

    fn user(name: &str, groups: &[&str]) -> Identity {
        Identity {
            user: name.into(),
            groups: groups.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The configuration issue 12 asks to work as written.
    fn documented() -> Policy {
        policy(
            vec![
                RuleConfig {
                    delete: vec!["user:ci".into()],
                    ..rule("", &["anonymous"], &["user:ci"])
                },
                rule(
                    "private/",
                    &["user:ci", "serviceaccount:build:builder", "namespace:prod"],
                    &["user:ci"],
                ),
            ],
            &[],
        )
    }

    #[test]
    fn longest_prefix_wins_at_component_boundaries() {
        let p = documented();
        let ci = user("ci", &[]);
        let bob = user("bob", &[]);
        let builder = user("system:serviceaccount:build:builder", &[]);
        let other_sa = user("system:serviceaccount:build:other", &[]);
        let prod_sa = user("system:serviceaccount:prod:web", &[]);
        let a = |who, name, action| p.allows(who, None, name, action);
        assert!(a(Who::Anonymous, "team/app", Action::Pull));
        assert!(!a(Who::Anonymous, "team/app", Action::Push));
        assert!(a(Who::User(&ci), "team/app", Action::Push));
        assert!(a(Who::User(&ci), "team/app", Action::Delete));
        assert!(
            a(Who::User(&bob), "team/app", Action::Pull),
            "anonymous covers users"
        );
        assert!(!a(Who::User(&bob), "team/app", Action::Delete));
        // private/ is the longest match: no anonymous, no delete for anyone.
        assert!(!a(Who::Anonymous, "private/app", Action::Pull));
        assert!(!a(Who::User(&bob), "private/app", Action::Pull));
        assert!(a(Who::User(&builder), "private/app", Action::Pull));
        assert!(!a(Who::User(&other_sa), "private/app", Action::Pull));
        assert!(a(Who::User(&prod_sa), "private/x/y", Action::Pull));
        assert!(!a(Who::User(&builder), "private/app", Action::Push));
        assert!(!a(Who::User(&ci), "private/app", Action::Delete));
        // A component boundary: privateer is not under private/.
        assert!(a(Who::Anonymous, "privateer/app", Action::Pull));
        assert!(!a(Who::Anonymous, "private", Action::Pull));
        // Nobody is admin unless a rule says so.
        assert!(!a(Who::User(&ci), "_lighter/gc", Action::Admin));
    }

    #[test]
    fn groups_authenticated_and_admin_endpoints() {
        let p = policy(
            vec![
                RuleConfig {
                    admin: vec!["group:ops".into()],
                    ..rule("", &["authenticated"], &[])
                },
                RuleConfig {
                    admin: vec!["anonymous".into()],
                    ..rule("_lighter/metrics", &[], &[])
                },
            ],
            &[],
        );
        let ops = user("alice", &["ops"]);
        let dev = user("bob", &["dev"]);
        assert!(!p.allows(Who::Anonymous, None, "a", Action::Pull));
        assert!(p.allows(Who::User(&dev), None, "a", Action::Pull));
        assert!(p.allows(Who::User(&ops), None, "_lighter/gc", Action::Admin));
        assert!(!p.allows(Who::User(&dev), None, "_lighter/gc", Action::Admin));
        assert!(p.allows(Who::Anonymous, None, "_lighter/metrics", Action::Admin));
        assert_eq!(
            p.granted(
                Who::User(&ops),
                None,
                "a",
                Actions::NONE.with(Action::Pull).with(Action::Push)
            ),
            Actions::NONE.with(Action::Pull)
        );
    }

    #[test]
    fn anonymous_is_limited_to_its_networks_but_users_are_not() {
        let p = policy(
            vec![rule("", &["anonymous"], &[])],
            &["198.18.0.0/16", "fd00::/8"],
        );
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert!(p.allows(Who::Anonymous, ip("198.18.3.4"), "a", Action::Pull));
        assert!(p.allows(Who::Anonymous, ip("::ffff:198.18.3.4"), "a", Action::Pull));
        assert!(p.allows(Who::Anonymous, ip("fd00::1"), "a", Action::Pull));
        assert!(!p.allows(Who::Anonymous, ip("198.19.0.1"), "a", Action::Pull));
        assert!(!p.allows(Who::Anonymous, None, "a", Action::Pull));
        let bob = user("bob", &[]);
        assert!(p.allows(Who::User(&bob), ip("198.19.0.1"), "a", Action::Pull));
    }

    #[test]
    fn bad_rules_are_refused_with_the_reason() {
        let bad = |rules: Vec<RuleConfig>, cidrs: &[&str]| {
            Policy::new(&AuthConfig {
                rules,
                anonymous_cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })
            .unwrap_err()
        };
        assert!(bad(vec![rule("", &["everyone"], &[])], &[]).contains("everyone"));
        assert!(bad(vec![rule("", &["serviceaccount:x"], &[])], &[]).contains("serviceaccount"));
        assert!(bad(vec![rule("", &["user:"], &[])], &[]).contains("user"));
        assert!(bad(vec![rule("../x", &[], &[])], &[]).contains("prefix"));
        assert!(bad(vec![rule("Team", &[], &[])], &[]).contains("prefix"));
        assert!(bad(vec![rule("a/", &[], &[]), rule("a", &[], &[])], &[]).contains("twice"));
        assert!(bad(vec![rule("", &[], &[])], &["10.0.0.0/33"]).contains("CIDR"));
        assert!(Policy::new(&AuthConfig::default()).unwrap().is_none());
    }
}
