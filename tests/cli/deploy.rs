//! Checks the files in `deploy/` instead of trusting them: Prometheus config and alert rules
//! through `promtool` (syntax, and unit tests that make every alert fire and stay quiet as it
//! should), every YAML and JSON file parsed, every metric the dashboard and rules query declared
//! in `keyfleet::telemetry::metrics::NAMES` (or on a short list of external metrics), every dashboard query
//! valid PromQL, and the compose file, Kubernetes manifests and Dockerfile agreeing with each
//! other and with the worker's contract (port 9464, /healthz, /readyz, drain timeout, queue).
//!
//! promtool comes from the Debian package `prometheus`; scripts/test.sh installs it. Without it
//! these tests fail (they never skip).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use keyfleet::telemetry::metrics::{HISTOGRAMS, NAMES};
use serde::Deserialize;
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

/// Metrics the dashboard and alerts may use that keyfleet does not export: Prometheus' own
/// scrape health, and RabbitMQ's per-queue depth from its rabbitmq_prometheus plugin
/// (`/metrics/per-object`, the `rabbitmq` scrape job).
const EXTERNAL_METRICS: &[&str] = &[
    "up",
    "rabbitmq_queue_messages_ready",
    "rabbitmq_queue_messages",
];

/// Seconds in a `KEYFLEET_DRAIN_TIMEOUT` value such as `30s` (`1m`): what grace periods must
/// exceed. Absent, the worker's default applies: 30 s.
fn drain_timeout_secs(value: Option<&str>) -> i64 {
    let Some(v) = value else { return 30 };
    if let Some(m) = v.strip_suffix('m') {
        return m.parse::<i64>().expect("minutes") * 60;
    }
    v.trim_end_matches('s').parse().expect("seconds")
}

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(deploy())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): run scripts/test.sh, which installs it \
                 (Debian package `prometheus`), or `apt-get install prometheus`"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// Every file under `dir` (recursively) whose name ends with one of `exts`.
fn files(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                todo.push(path);
            } else if exts
                .iter()
                .any(|x| path.extension().is_some_and(|e| e == *x))
            {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn yaml_docs(path: &Path) -> Vec<Yaml> {
    let text = read(path);
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Yaml::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn yaml(path: &str) -> Yaml {
    let mut docs = yaml_docs(&deploy().join(path));
    assert_eq!(docs.len(), 1, "{path}: one document expected");
    docs.remove(0)
}

fn dashboard() -> Json {
    let path = deploy().join("grafana/dashboards/keyfleet.json");
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// (where, expression) for every panel target of the dashboard.
fn dashboard_exprs(d: &Json) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr").to_owned();
            out.push((format!("panel {} {}", p["title"], t["refId"]), expr));
        }
    }
    out
}

/// (alert name, expression) for every rule of alerts.yml.
fn alert_exprs() -> Vec<(String, String)> {
    let rules = yaml("prometheus/alerts.yml");
    let mut out = Vec::new();
    for g in rules["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            let name = r["alert"].as_str().or(r["record"].as_str()).expect("name");
            out.push((
                name.to_owned(),
                r["expr"].as_str().expect("expr").to_owned(),
            ));
        }
    }
    out
}

/// Grafana's variables, replaced by what they expand to, so that promtool can parse the query.
fn without_grafana_variables(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$provider", ".*")
}

/// Metric names an expression selects: identifiers outside strings, label matchers, ranges
/// and grouping lists that are not functions, keywords or numbers.
fn metric_names_in(expr: &str) -> BTreeSet<String> {
    // Aggregation operators may put their grouping before the parenthesis
    // (`sum by (le) (...)`), so they are not always followed by `(` like functions.
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    const LABEL_LIST_BEFORE: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let c: Vec<char> = expr.chars().collect();
    let next_non_space = |mut i: usize| {
        while i < c.len() && c[i].is_whitespace() {
            i += 1;
        }
        c.get(i).copied()
    };
    let skip_to = |mut i: usize, close: char| {
        let mut quote = None;
        while i < c.len() {
            match (quote, c[i]) {
                (Some(_), '\\') => i += 1,
                (Some(q), ch) if ch == q => quote = None,
                (None, '"' | '\'' | '`') => quote = Some(c[i]),
                (None, ch) if ch == close => return i + 1,
                _ => {}
            }
            i += 1;
        }
        i
    };
    let mut names = BTreeSet::new();
    let mut label_list_next = false;
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch == '"' || ch == '\'' || ch == '`' {
            i = skip_to(i + 1, ch);
        } else if ch == '{' {
            i = skip_to(i + 1, '}');
        } else if ch == '[' {
            i = skip_to(i + 1, ']');
        } else if ch == '(' && label_list_next {
            i = skip_to(i + 1, ')');
            label_list_next = false;
        } else if ch.is_ascii_digit() || ch == '.' || ch == '$' {
            i += 1;
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_' || c[i] == '.') {
                i += 1;
            }
        } else if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' {
            let start = i;
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_' || c[i] == ':') {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let next = next_non_space(i);
            if LABEL_LIST_BEFORE.contains(&word.as_str()) {
                label_list_next = next == Some('(');
            } else if KEYWORDS.contains(&word.as_str()) || next == Some('(') {
                // a keyword or a function call
            } else {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// A name keyfleet exports, or a histogram's `_bucket`/`_sum`/`_count` series.
fn is_keyfleet_metric(name: &str) -> bool {
    NAMES.contains(&name)
        || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|base| HISTOGRAMS.contains(&base))
        })
}

/// Every `keyfleet_[a-z0-9_]+` in `text`, wherever it appears (expressions, legends, variable
/// queries, test series, comments).
fn keyfleet_names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    for (at, _) in text.match_indices("keyfleet_") {
        let before = at.checked_sub(1).map(|i| bytes[i]);
        if before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':') {
            continue;
        }
        let end = text[at..]
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .map_or(text.len(), |n| at + n);
        if end > at + "keyfleet_".len() {
            out.insert(text[at..end].to_owned());
        }
    }
    out
}

#[test]
fn prometheus_config_is_valid() {
    let out = promtool(&["check", "config", "prometheus/prometheus.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn alert_rules_are_valid() {
    let out = promtool(&["check", "rules", "prometheus/alerts.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn alert_rules_fire_when_they_should_and_only_then() {
    let out = promtool(&["test", "rules", "prometheus/alerts.test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn every_alert_is_documented_and_unit_tested() {
    let tests = read(&deploy().join("prometheus/alerts.test.yml"));
    let rules = yaml("prometheus/alerts.yml");
    let mut seen = BTreeSet::new();
    for g in rules["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            let name = r["alert"].as_str().expect("only alerting rules here");
            assert!(seen.insert(name.to_owned()), "{name} defined twice");
            assert!(name.starts_with("Keyfleet"), "{name}");
            let severity = r["labels"]["severity"].as_str();
            assert!(
                matches!(severity, Some("page" | "warning")),
                "{name}: severity {severity:?}"
            );
            for a in ["summary", "description"] {
                let text = r["annotations"][a].as_str().unwrap_or_default();
                assert!(text.len() > 10, "{name}: annotation {a} missing");
            }
            assert!(
                tests.contains(&format!("alertname: {name}\n")),
                "{name} has no case in alerts.test.yml"
            );
        }
    }
    for required in [
        "KeyfleetJobsStalled",
        "KeyfleetDeadLettered",
        "KeyfleetQuotaNearlyFull",
        "KeyfleetWorkerDown",
        "KeyfleetKeygenSlow",
    ] {
        assert!(seen.contains(required), "missing alert {required}");
    }
}

#[test]
fn every_yaml_and_json_file_parses() {
    let yamls = files(&deploy(), &["yml", "yaml"]);
    assert!(yamls.len() >= 10, "{yamls:?}");
    for path in &yamls {
        assert!(!yaml_docs(path).is_empty(), "{}: empty", path.display());
        assert!(
            read(path).starts_with('#'),
            "{}: should open with a comment saying what it is for",
            path.display()
        );
    }
    let jsons = files(&deploy(), &["json"]);
    assert!(!jsons.is_empty());
    for path in jsons {
        serde_json::from_str::<Json>(&read(&path))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[test]
fn dashboard_and_rules_query_only_declared_metrics() {
    let mut texts = vec![read(&deploy().join("grafana/dashboards/keyfleet.json"))];
    for f in files(&deploy().join("prometheus"), &["yml", "yaml"]) {
        texts.push(read(&f));
    }
    let mut unknown = BTreeSet::new();
    for text in &texts {
        for name in keyfleet_names_in(text) {
            if !is_keyfleet_metric(&name) {
                unknown.insert(name);
            }
        }
    }
    let mut exprs = dashboard_exprs(&dashboard());
    exprs.extend(alert_exprs());
    for (whence, expr) in &exprs {
        let names = metric_names_in(expr);
        assert!(!names.is_empty(), "{whence}: no metric found in {expr}");
        for name in names {
            if !is_keyfleet_metric(&name) && !EXTERNAL_METRICS.contains(&name.as_str()) {
                unknown.insert(format!("{name} ({whence})"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "not in keyfleet::telemetry::metrics::NAMES (nor EXTERNAL_METRICS): {unknown:?}"
    );
}

#[test]
fn metric_name_extraction() {
    let names = metric_names_in(
        r#"histogram_quantile(0.99, sum by (le, bits) (rate(keyfleet_keygen_seconds_bucket{bits="2048", x=~"a|b"}[5m]))) > 0.5
           and on (instance) up{job="keyfleet-worker"} == bool 0 or vector(0) unless max without (x) (foo offset 5m)"#,
    );
    let names: Vec<_> = names.iter().map(String::as_str).collect();
    assert_eq!(names, ["foo", "keyfleet_keygen_seconds_bucket", "up"]);
    assert!(is_keyfleet_metric("keyfleet_keygen_seconds_bucket"));
    assert!(!is_keyfleet_metric("keyfleet_jobs_total_bucket"));
    let found: Vec<_> = keyfleet_names_in("a keyfleet_jobs_total{x} Only keyfleet_* x_keyfleet_y")
        .into_iter()
        .collect();
    assert_eq!(found, ["keyfleet_jobs_total"]);
}

#[test]
fn dashboard_queries_are_valid_promql() {
    // promtool parses PromQL only inside rule files: wrap each query as a recording rule.
    let d = dashboard();
    let rules: Vec<Json> = dashboard_exprs(&d)
        .iter()
        .enumerate()
        .map(|(i, (_, expr))| {
            serde_json::json!({
                "record": format!("dashboard:query_{i}"),
                "expr": without_grafana_variables(expr),
            })
        })
        .collect();
    let file = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dashboard-queries.yml");
    // JSON is YAML: promtool reads it as a rule file.
    std::fs::write(&path, file.to_string()).expect("write rules");
    let out = promtool(&["check", "rules", path.to_str().expect("utf-8 path")]);
    assert!(
        out.contains(&format!("{} rules found", rules.len())),
        "{out}"
    );
}

#[test]
fn dashboard_shows_every_metric_through_its_data_source_variable() {
    let d = dashboard();
    assert_eq!(d["uid"], "keyfleet");
    let vars = d["templating"]["list"].as_array().expect("templating");
    assert!(
        vars.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a `datasource` variable of type prometheus"
    );
    let mut ids = BTreeSet::new();
    for p in d["panels"].as_array().expect("panels") {
        let title = &p["title"];
        assert!(
            ids.insert(p["id"].as_i64().expect("id")),
            "duplicate id at {title}"
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        for t in p["targets"].as_array().expect("targets") {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
        }
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_i64().expect("x"), g["w"].as_i64().expect("w"));
        assert!(x >= 0 && w > 0 && x + w <= 24, "{title}: gridPos {g}");
        assert!(
            p["description"].as_str().is_some_and(|s| !s.is_empty()),
            "{title}"
        );
    }
    let all: String = dashboard_exprs(&d)
        .into_iter()
        .map(|(_, e)| e + "\n")
        .collect();
    for name in NAMES {
        assert!(all.contains(name), "no panel shows {name}");
    }
    for title in [
        "Keys per second",
        "Jobs by outcome",
        "Quota used per region",
        "Backlog and jobs in flight",
        "Key generation time per key",
        "Job duration",
        "Queue wait",
        "Reservoir fill",
    ] {
        assert!(
            d["panels"]
                .as_array()
                .expect("panels")
                .iter()
                .any(|p| p["title"] == title),
            "missing panel {title}"
        );
    }
    assert!(all.contains(r#"sum(rate(keyfleet_jobs_total{outcome="created""#));
}

#[test]
fn grafana_provisioning_matches_compose() {
    let ds = yaml("grafana/provisioning/datasources/prometheus.yml");
    let ds = &ds["datasources"][0];
    assert_eq!(ds["type"].as_str(), Some("prometheus"));
    assert_eq!(ds["url"].as_str(), Some("http://prometheus:9090"));
    let provider = yaml("grafana/provisioning/dashboards/keyfleet.yml");
    let dash_path = provider["providers"][0]["options"]["path"]
        .as_str()
        .expect("dashboard path");

    let compose = yaml("docker-compose.yml");
    let grafana = &compose["services"]["grafana"];
    let mounts: Vec<&str> = grafana["volumes"]
        .as_sequence()
        .expect("grafana volumes")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert!(
        mounts
            .iter()
            .any(|m| m.starts_with("./grafana/dashboards:") && m.contains(dash_path)),
        "{mounts:?} must mount the dashboards at {dash_path}"
    );
    assert!(mounts
        .iter()
        .any(|m| m.starts_with("./grafana/provisioning:/etc/grafana/provisioning")));
}

#[test]
fn compose_runs_the_whole_stack() {
    let compose = yaml("docker-compose.yml");
    let services = compose["services"].as_mapping().expect("services");
    let service = |name: &str| {
        services
            .get(name)
            .unwrap_or_else(|| panic!("compose service {name} missing"))
    };
    assert_eq!(
        service("rabbitmq")["image"].as_str(),
        Some("rabbitmq:3-management")
    );
    assert_eq!(service("redis")["image"].as_str(), Some("redis:7"));
    service("grafana");

    let worker = service("worker");
    assert_eq!(
        worker["build"]["dockerfile"].as_str(),
        Some("deploy/Dockerfile")
    );
    assert_eq!(worker["build"]["context"].as_str(), Some(".."));
    assert!(
        worker["deploy"]["replicas"].as_i64() >= Some(2),
        "two workers"
    );
    let env = &worker["environment"];
    assert_eq!(
        env["KEYFLEET_AMQP_URL"].as_str(),
        Some("amqp://guest:guest@rabbitmq:5672/%2f")
    );
    assert_eq!(
        env["KEYFLEET_REDIS_URL"].as_str(),
        Some("redis://redis:6379/")
    );
    assert_eq!(env["KEYFLEET_METRICS_ADDR"].as_str(), Some("0.0.0.0:9464"));
    let grace = worker["stop_grace_period"]
        .as_str()
        .expect("stop_grace_period");
    let grace: i64 = grace.trim_end_matches('s').parse().expect("seconds");
    let drain = drain_timeout_secs(env["KEYFLEET_DRAIN_TIMEOUT"].as_str());
    assert!(
        grace > drain,
        "stop_grace_period {grace} s <= drain timeout {drain} s"
    );

    let prom = service("prometheus");
    let cmd: Vec<&str> = prom["command"]
        .as_sequence()
        .expect("command")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert!(cmd.contains(&"--config.file=/etc/prometheus/prometheus.yml"));
    let vols: Vec<&str> = prom["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert!(
        vols.contains(&"./prometheus:/etc/prometheus:ro"),
        "{vols:?}"
    );

    // Every host path mounted exists (relative to deploy/, where the compose file is).
    for (name, svc) in services {
        for v in svc["volumes"].as_sequence().into_iter().flatten() {
            let v = v.as_str().expect("short volume syntax");
            if let Some(host) = v.strip_prefix("./") {
                let host = host.split(':').next().unwrap_or_default();
                assert!(deploy().join(host).exists(), "{name:?}: {v}: no such path");
            }
        }
    }

    // The compose job scrapes the worker service on the metrics port.
    let prom_cfg = yaml("prometheus/prometheus.yml");
    let jobs = prom_cfg["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs");
    let job = |name: &str| {
        jobs.iter()
            .find(|j| j["job_name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("scrape job {name} missing"))
    };
    let sd = &job("keyfleet-worker")["dns_sd_configs"][0];
    assert_eq!(sd["names"][0].as_str(), Some("worker"));
    assert_eq!(sd["port"].as_i64(), Some(9464));
    assert_eq!(
        job("keyfleet-local")["static_configs"][0]["targets"][0].as_str(),
        Some("127.0.0.1:9464")
    );
}

#[test]
fn kubernetes_manifests_agree_with_each_other_and_the_worker() {
    let dir = deploy().join("k8s");
    let mut by_kind: BTreeMap<(String, String), Yaml> = BTreeMap::new();
    for path in files(&dir, &["yaml", "yml"]) {
        for doc in yaml_docs(&path) {
            let kind = doc["kind"].as_str().expect("kind").to_owned();
            let name = doc["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            assert!(
                doc["apiVersion"].as_str().is_some(),
                "{}: apiVersion",
                path.display()
            );
            by_kind.insert((kind, name), doc);
        }
    }
    let get = |kind: &str, name: &str| {
        by_kind
            .get(&(kind.to_owned(), name.to_owned()))
            .unwrap_or_else(|| panic!("no {kind} {name:?} in deploy/k8s"))
    };

    // Kustomization lists files that exist.
    for r in get("Kustomization", "")["resources"]
        .as_sequence()
        .expect("resources")
    {
        let r = r.as_str().expect("resource path");
        assert!(dir.join(r).exists(), "kustomization: {r} missing");
    }

    let dep = get("Deployment", "keyfleet-worker");
    let pod = &dep["spec"]["template"]["spec"];
    let grace = pod["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("grace period");
    let config = &get("ConfigMap", "keyfleet-worker")["data"];
    let drain = drain_timeout_secs(config["KEYFLEET_DRAIN_TIMEOUT"].as_str());
    assert!(
        grace > drain,
        "grace {grace} s must exceed the drain timeout {drain} s"
    );
    let c = &pod["containers"][0];
    let port_name = c["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .find(|p| p["containerPort"].as_i64() == Some(9464))
        .and_then(|p| p["name"].as_str())
        .expect("a named container port 9464");
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        let port = &get["port"];
        assert!(
            port.as_str() == Some(port_name) || port.as_i64() == Some(9464),
            "{probe} port {port:?}"
        );
    }
    let res = &c["resources"];
    assert_eq!(
        res["requests"]["cpu"].as_str(),
        Some("2"),
        "2 cores per worker"
    );
    for (k, v) in [("requests", "memory"), ("limits", "memory")] {
        assert!(res[k][v].as_str().is_some(), "resources.{k}.{v}");
    }
    for src in c["envFrom"].as_sequence().expect("envFrom") {
        if let Some(name) = src["configMapRef"]["name"].as_str() {
            get("ConfigMap", name);
        }
        if let Some(name) = src["secretRef"]["name"].as_str() {
            let secret = get("Secret", name);
            for key in ["KEYFLEET_AMQP_URL", "KEYFLEET_REDIS_URL"] {
                assert!(
                    secret["stringData"][key].as_str().is_some(),
                    "secret key {key}"
                );
            }
        }
    }
    assert_eq!(
        get("ConfigMap", "keyfleet-worker")["data"]["KEYFLEET_METRICS_ADDR"].as_str(),
        Some("0.0.0.0:9464")
    );

    let labels = &dep["spec"]["template"]["metadata"]["labels"];
    let svc = get("Service", "keyfleet-worker");
    for (k, v) in svc["spec"]["selector"].as_mapping().expect("selector") {
        assert_eq!(&labels[k], v, "service selector {k:?} matches the pods");
    }
    assert_eq!(svc["spec"]["ports"][0]["port"].as_i64(), Some(9464));

    let so = get("ScaledObject", "keyfleet-worker");
    assert_eq!(so["apiVersion"].as_str(), Some("keda.sh/v1alpha1"));
    assert_eq!(
        so["spec"]["scaleTargetRef"]["name"].as_str(),
        Some("keyfleet-worker")
    );
    let trigger = &so["spec"]["triggers"][0];
    assert_eq!(trigger["type"].as_str(), Some("rabbitmq"));
    assert_eq!(
        trigger["metadata"]["queueName"].as_str(),
        Some("keyfleet.jobs")
    );
    assert_eq!(trigger["metadata"]["mode"].as_str(), Some("QueueLength"));
    let value: u64 = trigger["metadata"]["value"]
        .as_str()
        .expect("value is a string")
        .parse()
        .expect("a number");
    assert!(value > 0);
    let auth_name = trigger["authenticationRef"]["name"]
        .as_str()
        .expect("authenticationRef");
    let auth = get("TriggerAuthentication", auth_name);
    let secret_ref = &auth["spec"]["secretTargetRef"][0];
    assert_eq!(secret_ref["parameter"].as_str(), Some("host"));
    let secret = get("Secret", secret_ref["name"].as_str().expect("secret name"));
    let key = secret_ref["key"].as_str().expect("secret key");
    assert!(secret["stringData"][key]
        .as_str()
        .is_some_and(|u| u.starts_with("amqp")));
}

#[test]
fn dockerfile_builds_both_binaries_and_runs_the_worker_unprivileged() {
    let text = read(&deploy().join("Dockerfile"));
    let froms: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("FROM "))
        .collect();
    assert_eq!(froms.len(), 2, "multi-stage: {froms:?}");
    assert!(froms[0].starts_with("rust:1.95-bookworm"), "{}", froms[0]);
    assert!(froms[1].starts_with("debian:bookworm-slim"), "{}", froms[1]);
    for needle in [
        "-p keyfleet -p keyfleet-worker",
        "--release",
        "ca-certificates",
        "EXPOSE 9464",
        r#"ENTRYPOINT ["keyfleet-worker"]"#,
    ] {
        assert!(text.contains(needle), "Dockerfile lacks {needle}");
    }
    let user = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER");
    assert!(
        !user.starts_with("root") && !user.starts_with("0"),
        "USER {user}"
    );
}
