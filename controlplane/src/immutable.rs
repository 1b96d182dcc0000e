//! Immutable tags (`[[immutable_tags]]`): per repository prefix (at a component boundary, as
//! the access rules match), tag patterns (`v*`, `*` with `except = ["latest"]`) whose tags,
//! once written, name one manifest for good. A push that would move such a tag to another
//! digest, a delete of it, or a delete by digest of a manifest it names is refused with
//! `DENIED` (403) and a message naming the rule; writing it again with the same digest (an
//! idempotent push) is allowed. Mirrored repositories follow upstream and are exempt.
//!
//! The check and the write it guards happen under `App::tag_writes`, so of two pushes of a new
//! immutable tag at once one writes it and the other finds it written (and is refused if its
//! digest differs). Every tag write and removal takes that lock.

use hyper::StatusCode;
use lighter_layout::{Digest, RepoName, Tag};
use serde::{Deserialize, Serialize};

use crate::app::App;
use crate::error::{ApiError, Code};

/// One `[[immutable_tags]]` rule.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImmutableRule {
    /// Repository prefix at a component boundary (`release/` and `release` both match
    /// `release/app`); `""`: every repository.
    pub prefix: String,
    /// Tag patterns: `*` any run of characters, `?` one character.
    pub tags: Vec<String>,
    /// Tag patterns exempt from `tags` (e.g. `["latest"]` with `tags = ["*"]`).
    #[serde(default)]
    pub except: Vec<String>,
}

/// Rejects rules that cannot work, naming the rule.
pub fn validate(rules: &[ImmutableRule]) -> Result<(), String> {
    for (i, r) in rules.iter().enumerate() {
        check_prefix(&r.prefix).map_err(|e| format!("immutable_tags[{i}].prefix: {e}"))?;
        if r.tags.is_empty() {
            return Err(format!(
                "immutable_tags[{i}].tags is empty: list tag patterns such as \"v*\" (\"*\" for every tag)"
            ));
        }
        for p in &r.tags {
            check_pattern(p).map_err(|e| format!("immutable_tags[{i}].tags: {e}"))?;
        }
        for p in &r.except {
            check_pattern(p).map_err(|e| format!("immutable_tags[{i}].except: {e}"))?;
        }
    }
    Ok(())
}

/// The first rule that makes `tag` of `repo` immutable, with its index.
pub fn rule_for<'a>(
    rules: &'a [ImmutableRule],
    repo: &str,
    tag: &str,
) -> Option<(usize, &'a ImmutableRule)> {
    rules.iter().enumerate().find(|(_, r)| {
        prefix_matches(repo, &r.prefix)
            && r.tags.iter().any(|p| glob(p, tag))
            && !r.except.iter().any(|p| glob(p, tag))
    })
}

/// Whether `tag` of local repository `name` is immutable here (mirrors are exempt).
pub fn is_immutable(app: &App, name: &RepoName, tag: &str) -> Option<String> {
    if app.mirrors.target(name, None).is_some() {
        return None;
    }
    rule_for(&app.config.immutable_tags, name.as_str(), tag).map(|(i, r)| describe(i, r))
}

/// Whether any rule may cover a tag of local repository `name`.
pub fn covers_repository(app: &App, name: &RepoName) -> bool {
    app.config
        .immutable_tags
        .iter()
        .any(|r| prefix_matches(name.as_str(), &r.prefix))
        && app.mirrors.target(name, None).is_none()
}

/// Refuses writing `tag` to `to` (None: deleting it) when an immutable rule covers it and it
/// names another manifest now. Call with `App::tag_writes` held, and write under it.
pub fn check_tag(
    app: &App,
    name: &RepoName,
    tag: &Tag,
    to: Option<&Digest>,
) -> Result<(), ApiError> {
    let Some(rule) = is_immutable(app, name, tag.as_str()) else {
        return Ok(());
    };
    let Some(now) = app.layout.tag(name, tag)? else {
        return Ok(()); // a new tag (or nothing to delete)
    };
    match to {
        Some(d) if *d == now.digest => Ok(()),
        Some(d) => Err(denied(format!(
            "tag {tag} of {name} is immutable ({rule}): it names {} and cannot be moved to {d}; push under a new tag",
            now.digest
        ))),
        None => Err(denied(format!(
            "tag {tag} of {name} is immutable ({rule}): it cannot be deleted"
        ))),
    }
}

/// Refuses deleting manifest `digest` of `name` while an immutable tag names it. Call with
/// `App::tag_writes` held.
pub fn check_manifest_delete(app: &App, name: &RepoName, digest: &Digest) -> Result<(), ApiError> {
    if app.config.immutable_tags.is_empty() {
        return Ok(());
    }
    for tag in app.layout.tags_of(name, digest)? {
        if let Some(rule) = is_immutable(app, name, tag.as_str()) {
            return Err(denied(format!(
                "manifest {digest} of {name} is named by immutable tag {tag} ({rule}): it cannot be deleted"
            )));
        }
    }
    Ok(())
}

/// Refuses deleting blob `digest` of `name` while an image an immutable tag names (directly,
/// or as a child of the index it names) uses it: the release would no longer pull. Call with
/// `App::tag_writes` held. Reads the manifests of the repository's immutable tags: blob
/// deletes are rare, and only repositories an immutable rule covers pay for it.
pub fn check_blob_delete(app: &App, name: &RepoName, digest: &Digest) -> Result<(), ApiError> {
    if !covers_repository(app, name) {
        return Ok(());
    }
    for tag in app.layout.tags(name)?.unwrap_or_default() {
        let Some(rule) = is_immutable(app, name, &tag) else {
            continue;
        };
        let Ok(t) = Tag::parse(&tag) else { continue };
        let Some(entry) = app.layout.tag(name, &t)? else {
            continue;
        };
        // The tagged manifest, and an index's children (an index of indexes at most).
        let mut stack = vec![(entry.digest, 0u8)];
        while let Some((m, depth)) = stack.pop() {
            let Some(bytes) = app.layout.read_content(&m)? else {
                continue;
            };
            let Ok(inspected) = lighter_layout::manifest::inspect(&bytes, None) else {
                continue;
            };
            match inspected.kind {
                lighter_layout::media::ManifestKind::Index if depth < 2 => {
                    stack.extend(inspected.references.into_iter().map(|c| (c, depth + 1)));
                }
                lighter_layout::media::ManifestKind::Image
                    if inspected.references.contains(digest) =>
                {
                    return Err(denied(format!(
                        "blob {digest} of {name} is used by {m}, which immutable tag {tag} names ({rule}): it cannot be deleted"
                    )));
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn describe(i: usize, r: &ImmutableRule) -> String {
    let mut s = format!(
        "immutable_tags[{i}]: prefix {:?}, tags {:?}",
        r.prefix, r.tags
    );
    if !r.except.is_empty() {
        s.push_str(&format!(", except {:?}", r.except));
    }
    s
}

fn denied(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, Code::Denied, message)
}

/// `name` starts with `prefix` at a component boundary (`release/` and `release` both match
/// `release` and `release/app`, not `releases`); `""` matches everything.
pub fn prefix_matches(name: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    prefix.is_empty()
        || (name.starts_with(prefix)
            && matches!(name.as_bytes().get(prefix.len()), None | Some(b'/')))
}

/// A rule's repository prefix: a repository name or a prefix of one, or `""`.
pub fn check_prefix(p: &str) -> Result<(), String> {
    let trimmed = p.trim_end_matches('/');
    if trimmed.is_empty() || RepoName::parse(trimmed).is_ok() {
        Ok(())
    } else {
        Err(format!(
            "{p:?} is not a repository name or a prefix of one (lowercase letters, digits, . _ - and /), or \"\" for every repository"
        ))
    }
}

/// A tag pattern: tag characters (letters, digits, `_ . -`), `*` and `?`, at most 128.
pub fn check_pattern(p: &str) -> Result<(), String> {
    let ok = !p.is_empty()
        && p.len() <= 128
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'*' | b'?'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{p:?} is not a tag pattern (tag characters A-Z a-z 0-9 _ . -, with * for any run and ? for one character)"
        ))
    }
}

/// Whether `text` matches the glob `pattern` (`*` any run, `?` one character). Linear:
/// backtracks only to the last `*`.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < t.len() {
        if i < p.len() && (p[i] == b'?' || p[i] == t[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == b'*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (p, t, m) in [
            ("v*", "v1.2.3", true),
            ("v*", "v", true),
            ("v*", "latest", false),
            ("*", "anything", true),
            ("v?.*", "v1.0", true),
            ("v?.*", "v10.0", false),
            ("*-rc*", "1.0-rc2", true),
            ("*-rc*", "1.0", false),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("latest", "latest", true),
            ("latest", "latest2", false),
        ] {
            assert_eq!(glob(p, t), m, "{p} ~ {t}");
        }
    }

    #[test]
    fn rules_match_at_component_boundaries_and_except_wins() {
        let rules = vec![
            ImmutableRule {
                prefix: "release/".into(),
                tags: vec!["v*".into()],
                except: vec![],
            },
            ImmutableRule {
                prefix: "prod".into(),
                tags: vec!["*".into()],
                except: vec!["latest".into()],
            },
        ];
        assert_eq!(rule_for(&rules, "release/app", "v1").map(|r| r.0), Some(0));
        assert_eq!(rule_for(&rules, "release", "v1").map(|r| r.0), Some(0));
        assert!(rule_for(&rules, "releases/app", "v1").is_none());
        assert!(rule_for(&rules, "release/app", "latest").is_none());
        assert_eq!(rule_for(&rules, "prod/a/b", "1.0").map(|r| r.0), Some(1));
        assert!(rule_for(&rules, "prod/a/b", "latest").is_none());
        assert!(rule_for(&rules, "production", "1.0").is_none());
    }

    #[test]
    fn validation_names_the_rule_and_the_bad_pattern() {
        let rule = |prefix: &str, tags: &[&str], except: &[&str]| ImmutableRule {
            prefix: prefix.into(),
            tags: tags.iter().map(|s| s.to_string()).collect(),
            except: except.iter().map(|s| s.to_string()).collect(),
        };
        assert!(validate(&[rule("release/", &["v*"], &[])]).is_ok());
        assert!(validate(&[rule("", &["*"], &["latest"])]).is_ok());
        let err =
            validate(&[rule("release/", &["v*"], &[]), rule("x", &["v[0-9]"], &[])]).unwrap_err();
        assert!(
            err.contains("immutable_tags[1].tags") && err.contains("v[0-9]"),
            "{err}"
        );
        let err = validate(&[rule("Release/", &["v*"], &[])]).unwrap_err();
        assert!(err.contains("immutable_tags[0].prefix"), "{err}");
        let err = validate(&[rule("a", &[], &[])]).unwrap_err();
        assert!(err.contains("immutable_tags[0].tags is empty"), "{err}");
        let err = validate(&[rule("a", &["*"], &["lat est"])]).unwrap_err();
        assert!(err.contains("immutable_tags[0].except"), "{err}");
    }
}
