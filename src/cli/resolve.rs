//! The resolved layer: the optional `keyfleet.toml` and the one place its values meet the
//! flags' (flags > environment > config file > defaults), giving the plain settings a command
//! runs with. A bad value in the file names its setting and the file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::config::{
    parse_quota, parse_threads, MetricsAddr, UpstreamArgs, WorkerArgs, DEFAULT_CONFIG,
    DEFAULT_STATE, DEFAULT_WORKER_METRICS,
};
use crate::dialect::Catalog;
use crate::keys::keygen::{Engine, KeyBits};
use crate::settings::{KeyPairQuota, Settings};

/// `keyfleet.toml`. Every field is optional; flags and environment variables win.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub state: Option<PathBuf>,
    pub quota: Option<u64>,
    pub key_bits: Option<u32>,
    pub threads: Option<usize>,
    /// Region id → quota, overriding `quota` for that region.
    #[serde(default)]
    pub quota_per_region: BTreeMap<String, u64>,
    pub aliyun: Option<AliyunConfig>,
    pub ucloud: Option<UcloudConfig>,
    /// `[upstream.aliyun] endpoint = "http://…"`: where a provider's cloud API is (the
    /// command line's --upstream-endpoint wins).
    #[serde(default)]
    pub upstream: BTreeMap<String, UpstreamFileEntry>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFileEntry {
    pub endpoint: String,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliyunConfig {
    /// Region ids that exist (replaces the built-in public list).
    pub regions: Option<BTreeSet<String>>,
    /// Resource group ids that exist.
    pub resource_groups: Option<BTreeSet<String>>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UcloudConfig {
    pub regions: Option<BTreeSet<String>>,
    pub default_region: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("config file {path}: setting `{setting}` = {value}: {reason}")]
    Value {
        path: PathBuf,
        setting: String,
        value: String,
        reason: String,
    },
}

impl FileConfig {
    /// Loads `explicit`, or ./keyfleet.toml when it exists, or nothing.
    pub fn load(explicit: Option<&Path>) -> Result<(FileConfig, Option<PathBuf>), ConfigError> {
        let path = match explicit {
            Some(p) => p.to_owned(),
            None => {
                let p = PathBuf::from(DEFAULT_CONFIG);
                if !p.exists() {
                    return Ok((FileConfig::default(), None));
                }
                p
            }
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let cfg = FileConfig::parse(&text, &path)?;
        Ok((cfg, Some(path)))
    }

    pub fn parse(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
        let cfg: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let bad = |setting: &str, value: String, reason: &str| ConfigError::Value {
            path: path.to_owned(),
            setting: setting.to_owned(),
            value,
            reason: reason.to_owned(),
        };
        if let Some(q) = cfg.quota {
            parse_quota(&q.to_string())
                .map_err(|_| bad("quota", q.to_string(), "must be 1 to 10000000"))?;
        }
        for (region, q) in &cfg.quota_per_region {
            parse_quota(&q.to_string()).map_err(|_| {
                bad(
                    &format!("quota_per_region.{region}"),
                    q.to_string(),
                    "must be 1 to 10000000",
                )
            })?;
        }
        if let Some(t) = cfg.threads {
            parse_threads(&t.to_string()).map_err(|e| {
                bad(
                    "threads",
                    t.to_string(),
                    e.split(" (--").next().unwrap_or(&e),
                )
            })?;
        }
        if let Some(b) = cfg.key_bits {
            KeyBits::try_from(b).map_err(|e| bad("key_bits", b.to_string(), &e))?;
        }
        for (provider, entry) in &cfg.upstream {
            let spec = format!("{provider}={}", entry.endpoint);
            crate::upstream::http::parse_endpoint(&spec).map_err(|e| {
                bad(
                    &format!("upstream.{provider}.endpoint"),
                    format!("{:?}", entry.endpoint),
                    &e.to_string(),
                )
            })?;
        }
        if let Some(u) = &cfg.ucloud {
            if let (Some(d), Some(regions)) = (&u.default_region, &u.regions) {
                if !regions.contains(d) {
                    return Err(bad(
                        "ucloud.default_region",
                        format!("{d:?}"),
                        "is not one of ucloud.regions",
                    ));
                }
            }
        }
        Ok(cfg)
    }
}

/// What the command line says (flags and `KEYFLEET_*` variables, already merged by clap)
/// about settings the config file may also hold; `None` = not given.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub state: Option<PathBuf>,
    pub quota: Option<u64>,
    pub key_bits: Option<KeyBits>,
    pub threads: Option<usize>,
    pub engine: Engine,
}

/// The settings a command runs with.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub settings: Settings,
    /// The embedded state file.
    pub state: PathBuf,
    pub key_bits: KeyBits,
    /// Key-generation threads; 0 = one per core.
    pub threads: usize,
}

/// The one place sources are merged: flags > environment > config file > defaults.
pub fn resolve(cli: &Overrides, file: &FileConfig) -> Resolved {
    let mut catalog = Catalog::default();
    if let Some(a) = &file.aliyun {
        if let Some(r) = &a.regions {
            catalog.aliyun_regions = r.clone();
        }
        if let Some(g) = &a.resource_groups {
            catalog.resource_groups = g.clone();
        }
    }
    if let Some(u) = &file.ucloud {
        if let Some(r) = &u.regions {
            catalog.ucloud_regions = r.clone();
        }
        if let Some(d) = &u.default_region {
            catalog.ucloud_default_region = d.clone();
        }
    }
    let defaults = Settings::default();
    Resolved {
        settings: Settings {
            catalog,
            quota: KeyPairQuota {
                default: cli.quota.or(file.quota).unwrap_or(defaults.quota.default),
                per_region: file.quota_per_region.clone(),
            },
            engine: cli.engine,
            ..defaults
        },
        state: cli
            .state
            .clone()
            .or_else(|| file.state.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE)),
        // Validated when the file was parsed.
        key_bits: cli
            .key_bits
            .or_else(|| file.key_bits.and_then(|b| KeyBits::try_from(b).ok()))
            .unwrap_or_default(),
        threads: cli.threads.or(file.threads).unwrap_or(0),
    }
}

impl UpstreamArgs {
    /// The upstream these flags and the config file's `[upstream.<provider>]` endpoints name
    /// (the file's count for the providers the command line does not name; they were validated
    /// when the file was read): the endpoints named, then the public ones of `--upstream`.
    pub fn resolve(&self, file: &FileConfig) -> crate::upstream::settings::Settings {
        let mut endpoints = self.endpoints.clone();
        for (provider, entry) in &file.upstream {
            let spec = format!("{provider}={}", entry.endpoint);
            if let Ok((p, e)) = crate::upstream::http::parse_endpoint(&spec) {
                if !endpoints.iter().any(|(q, _)| *q == p) {
                    endpoints.push((p, e));
                }
            }
        }
        for p in &self.providers {
            if !endpoints.iter().any(|(q, _)| q == p) {
                endpoints.push((*p, crate::upstream::http::public_endpoint(*p)));
            }
        }
        crate::upstream::settings::Settings {
            endpoints,
            credentials: self.credentials.clone(),
            signing: self.signature,
            deadline: self.timeout,
        }
    }
}

impl WorkerArgs {
    /// The worker's configuration from flags, environment and config file.
    pub fn to_config(&self, file: &FileConfig) -> crate::modes::worker::WorkerConfig {
        let cli = Overrides {
            quota: self.quota,
            threads: self.cpu.threads,
            engine: self.cpu.engine,
            ..Overrides::default()
        };
        let resolved = resolve(&cli, file);
        let threads = resolved.threads;
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let per = if threads == 0 { cores } else { threads };
        crate::modes::worker::WorkerConfig {
            endpoints: self.server.endpoints(),
            // 4 per thread keep the threads busy; 64 more let the registry and broker round
            // trips of jobs that make no key (refusals, keys from the reservoir) overlap.
            concurrency: self
                .concurrency
                .unwrap_or((per * 4 + 64).min(u16::MAX as usize) as u16)
                .max(1),
            threads,
            settings: resolved.settings,
            reservoir: self.reservoir,
            reservoir_once: self.reservoir_once,
            upstream_rps: self.upstream_limit.upstream_rps,
            upstream_burst: self.upstream_limit.upstream_burst,
            upstream: self.upstream.resolve(file),
            drain_timeout: self.drain_timeout,
            metrics_addr: match self.metrics_addr {
                Some(MetricsAddr(addr)) => addr.map(crate::modes::worker::MetricsBind::Exactly),
                None => Some(crate::modes::worker::MetricsBind::Default(
                    DEFAULT_WORKER_METRICS,
                )),
            },
            allow_plaintext_results: self.allow_plaintext_results,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::config::parse_key_bits;

    #[test]
    fn bad_values_name_their_setting() {
        let p = Path::new("k.toml");
        let e = FileConfig::parse("quota = 0", p).unwrap_err().to_string();
        assert!(e.contains("`quota`") && e.contains('0'), "{e}");
        let e = FileConfig::parse("key_bits = 1024", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("key_bits") && e.contains("1024"), "{e}");
        let e = FileConfig::parse("[quota_per_region]\ncn-hangzhou = 0", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("quota_per_region.cn-hangzhou"), "{e}");
        let e = FileConfig::parse("quota = \"many\"", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("quota"), "{e}");
        let e = FileConfig::parse("qouta = 5", p).unwrap_err().to_string();
        assert!(e.contains("qouta"), "{e}");
        assert!(parse_quota("abc").unwrap_err().contains("KEYFLEET_QUOTA"));
        assert!(parse_key_bits("1024")
            .unwrap_err()
            .contains("KEYFLEET_KEY_BITS"));
    }

    #[test]
    fn file_values_apply_and_flags_win() {
        let cfg = FileConfig::parse(
            "quota = 20\nkey_bits = 3072\n[quota_per_region]\ncn-beijing = 5\n[aliyun]\nresource_groups = [\"rg-a\"]\n",
            Path::new("k.toml"),
        )
        .unwrap();
        let mut cli = Overrides::default();
        let r = resolve(&cli, &cfg);
        let s = r.settings;
        assert_eq!(s.quota.for_region("cn-hangzhou"), 20);
        assert_eq!(s.quota.for_region("cn-beijing"), 5);
        assert!(s.catalog.resource_groups.contains("rg-a"));
        assert_eq!(r.key_bits, KeyBits::B3072);
        assert_eq!(r.state, PathBuf::from(DEFAULT_STATE));
        cli.quota = Some(7);
        cli.key_bits = Some(KeyBits::B4096);
        let r = resolve(&cli, &cfg);
        assert_eq!(r.settings.quota.for_region("x"), 7);
        assert_eq!(r.key_bits, KeyBits::B4096);
    }
}
