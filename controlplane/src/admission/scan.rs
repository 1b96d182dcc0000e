//! Vulnerability reports (pure): the findings of a report pushed as a referrer, counted by
//! severity. Two formats are read, told apart by their content: Trivy's JSON
//! (`Results[].Vulnerabilities[].Severity`) and SARIF 2.1.0 (`runs[].results[]`, whose severity
//! is the result's or its rule's `properties.security-severity` score, else a severity word among
//! the rule's tags, else the result's `level`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A finding's severity, lowest first.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Unknown,
    Low,
    Medium,
    High,
    Critical,
}

const ALL: [Severity; 5] = [
    Severity::Critical,
    Severity::High,
    Severity::Medium,
    Severity::Low,
    Severity::Unknown,
];

impl Severity {
    pub fn word(self) -> &'static str {
        match self {
            Severity::Unknown => "unknown",
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }

    /// Trivy's and the tags' words (`CRITICAL`, `high`...).
    fn from_word(w: &str) -> Option<Severity> {
        ALL.into_iter().find(|s| s.word().eq_ignore_ascii_case(w))
    }

    /// A CVSS-like score as SARIF's `security-severity` gives it (GitHub's bands).
    fn from_score(score: f64) -> Severity {
        match score {
            s if s >= 9.0 => Severity::Critical,
            s if s >= 7.0 => Severity::High,
            s if s >= 4.0 => Severity::Medium,
            s if s > 0.0 => Severity::Low,
            _ => Severity::Unknown,
        }
    }
}

/// Findings per severity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts([u64; 5]);

impl Counts {
    fn add(&mut self, s: Severity) {
        self.0[s as usize] += 1;
    }

    pub fn get(&self, s: Severity) -> u64 {
        self.0[s as usize]
    }

    /// Findings at `s` or above.
    pub fn at_or_above(&self, s: Severity) -> u64 {
        self.0[s as usize..].iter().sum()
    }

    /// `1 critical, 3 high, 0 medium, 2 low, 0 unknown`.
    pub fn summary(&self) -> String {
        ALL.iter()
            .map(|&s| format!("{} {}", self.get(s), s.word()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Which format a report was in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Trivy,
    Sarif,
}

/// Counts the findings of a report; Err if it is in neither format.
pub fn read(bytes: &[u8]) -> Result<(Format, Counts), String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    if v.get("runs").is_some() && v.get("version").and_then(Value::as_str) == Some("2.1.0") {
        return sarif(&v).map(|c| (Format::Sarif, c));
    }
    if v.get("SchemaVersion").is_some() || v.get("ArtifactName").is_some() {
        return trivy(&v).map(|c| (Format::Trivy, c));
    }
    Err(
        "neither a Trivy JSON report (SchemaVersion, Results) nor SARIF 2.1.0 (version, runs)"
            .into(),
    )
}

fn trivy(v: &Value) -> Result<Counts, String> {
    let mut counts = Counts::default();
    let results = match v.get("Results") {
        None | Some(Value::Null) => return Ok(counts),
        Some(Value::Array(r)) => r,
        Some(_) => return Err("Trivy report: Results is not an array".into()),
    };
    for r in results {
        for vuln in r
            .get("Vulnerabilities")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let word = vuln.get("Severity").and_then(Value::as_str).unwrap_or("");
            counts.add(Severity::from_word(word).unwrap_or(Severity::Unknown));
        }
    }
    Ok(counts)
}

fn sarif(v: &Value) -> Result<Counts, String> {
    let mut counts = Counts::default();
    let runs = v
        .get("runs")
        .and_then(Value::as_array)
        .ok_or("SARIF: runs is not an array")?;
    for run in runs {
        let rules = run
            .pointer("/tool/driver/rules")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for result in run
            .get("results")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let rule = result
                .get("ruleIndex")
                .and_then(Value::as_u64)
                .and_then(|i| rules.get(i as usize))
                .or_else(|| {
                    let id = result.get("ruleId")?.as_str()?;
                    rules
                        .iter()
                        .find(|r| r.get("id").and_then(Value::as_str) == Some(id))
                });
            counts.add(sarif_severity(result, rule));
        }
    }
    Ok(counts)
}

fn sarif_severity(result: &Value, rule: Option<&Value>) -> Severity {
    let score = |o: &Value| {
        let s = o.pointer("/properties/security-severity")?;
        s.as_f64().or_else(|| s.as_str()?.trim().parse().ok())
    };
    if let Some(s) = score(result).or_else(|| rule.and_then(score)) {
        return Severity::from_score(s);
    }
    let tags = |o: &Value| -> Option<Severity> {
        o.pointer("/properties/tags")?
            .as_array()?
            .iter()
            .filter_map(|t| Severity::from_word(t.as_str()?))
            .max()
    };
    if let Some(s) = tags(result).or_else(|| rule.and_then(tags)) {
        return s;
    }
    let level = result
        .get("level")
        .or_else(|| rule?.pointer("/defaultConfiguration/level"))
        .and_then(Value::as_str);
    match level {
        Some("error") => Severity::High,
        Some("warning") => Severity::Medium,
        Some("note") => Severity::Low,
        // SARIF's default level is warning.
        None => Severity::Medium,
        Some(_) => Severity::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn trivy_findings_are_counted_by_severity() {
        let report = json!({
            "SchemaVersion": 2,
            "ArtifactName": "app",
            "Results": [
                {"Target": "os", "Vulnerabilities": [
                    {"VulnerabilityID": "CVE-1", "Severity": "CRITICAL"},
                    {"VulnerabilityID": "CVE-2", "Severity": "HIGH"},
                    {"VulnerabilityID": "CVE-3", "Severity": "HIGH"},
                ]},
                {"Target": "lang"},
                {"Target": "more", "Vulnerabilities": [{"Severity": "LOW"}, {"Severity": "weird"}]},
            ]
        });
        let (format, c) = read(report.to_string().as_bytes()).unwrap();
        assert_eq!(format, Format::Trivy);
        assert_eq!(
            c.summary(),
            "1 critical, 2 high, 0 medium, 1 low, 1 unknown"
        );
        assert_eq!(c.at_or_above(Severity::High), 3);
        assert_eq!(c.at_or_above(Severity::Critical), 1);
        let clean = json!({"SchemaVersion": 2, "Results": null});
        assert_eq!(
            read(clean.to_string().as_bytes()).unwrap().1,
            Counts::default()
        );
    }

    #[test]
    fn sarif_severity_comes_from_score_then_tags_then_level() {
        let report = json!({
            "version": "2.1.0",
            "runs": [{
                "tool": {"driver": {"name": "Trivy", "rules": [
                    {"id": "CVE-A", "properties": {"security-severity": "9.8"}},
                    {"id": "CVE-B", "properties": {"tags": ["vulnerability", "HIGH"]}},
                    {"id": "CVE-C", "defaultConfiguration": {"level": "note"}},
                ]}},
                "results": [
                    {"ruleId": "CVE-A", "ruleIndex": 0, "level": "error"},
                    {"ruleId": "CVE-B", "level": "warning"},
                    {"ruleId": "CVE-C"},
                    {"ruleId": "none", "level": "error"},
                    {"ruleId": "none", "properties": {"security-severity": 5.0}},
                    {"ruleId": "none"},
                ]
            }]
        });
        let (format, c) = read(report.to_string().as_bytes()).unwrap();
        assert_eq!(format, Format::Sarif);
        assert_eq!(
            c.summary(),
            "1 critical, 2 high, 2 medium, 1 low, 0 unknown"
        );
    }

    #[test]
    fn other_documents_are_not_reports() {
        assert!(read(b"{}").is_err());
        assert!(read(b"not json").is_err());
        assert!(read(br#"{"version": "2.1.0", "runs": 3}"#).is_err());
        assert!(read(br#"{"SchemaVersion": 2, "Results": {}}"#).is_err());
    }
}
