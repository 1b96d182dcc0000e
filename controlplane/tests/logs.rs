//! `log_format = "json"`: every line both planes and the supervisor write is one JSON object
//! (time, level, target, message and fields), for log collectors; `text` is the default; any
//! other value is refused at start, naming the field.

mod common;

use common::Server;
use serde_json::Value;

#[test]
fn json_logs_are_one_object_per_line_from_every_process() {
    let server = Server::start_args(&["--log-format", "json"]);
    // Something for the control plane to log: a request it refuses is logged at debug only,
    // so look at what every start logs.
    let r = Server::client().get(server.url("/v2/")).send().unwrap();
    assert_eq!(r.status(), 200);
    let lines = server.log_lines();
    assert!(lines.len() >= 3, "{lines:?}");
    let mut targets = std::collections::BTreeSet::new();
    for line in &lines {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"));
        assert!(
            v["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{line}"
        );
        assert!(
            matches!(
                v["level"].as_str(),
                Some("INFO" | "WARN" | "ERROR" | "DEBUG")
            ),
            "{line}"
        );
        assert!(v["fields"]["message"].is_string(), "{line}");
        targets.insert(
            v["target"]
                .as_str()
                .unwrap()
                .split("::")
                .next()
                .unwrap()
                .to_owned(),
        );
    }
    // The control plane (`lighter`) and the data plane (`lighter_dataplane`) both.
    assert!(targets.contains("lighter"), "{targets:?}");
    assert!(targets.contains("lighter_dataplane"), "{targets:?}");
    let listening = lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| {
            v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("listening on http://"))
        })
        .expect("the listening line");
    // Structured fields stay fields.
    assert!(listening["fields"]["cores"].is_u64(), "{listening}");
}

#[test]
fn text_logs_are_the_default_and_other_formats_are_refused() {
    let server = Server::start();
    assert!(server
        .log_lines()
        .iter()
        .all(|l| serde_json::from_str::<Value>(l).is_err()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lighter"))
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "xml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("log_format") && err.contains("xml"), "{err}");
}
