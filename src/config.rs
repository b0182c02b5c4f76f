//! Configuration: command-line flags (each with a `KEYFLEET_*` environment twin) over an
//! optional `keyfleet.toml`, over built-in defaults. A bad value names its setting.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::batch::Format;
use crate::dialect::{Catalog, Provider};
use crate::keygen::{Engine, KeyBits};
use crate::pipeline::{Quota, Settings};
use crate::progress::ProgressMode;

/// Where the embedded store lives unless told otherwise.
pub const DEFAULT_STATE: &str = "keyfleet.redb";
/// The optional config file read from the current folder.
pub const DEFAULT_CONFIG: &str = "keyfleet.toml";

#[derive(Debug, Parser)]
#[command(
    name = "keyfleet",
    version,
    about = "Create SSH key pairs in bulk with the semantics of Alibaba Cloud ECS CreateKeyPair and UCloud CreateUHostKeyPair",
    long_about = "Create SSH key pairs in bulk with the exact semantics of Alibaba Cloud ECS \
CreateKeyPair and UCloud CreateUHostKeyPair: names, tags, regions, quotas (500 per region) and \
error codes as the APIs answer them.\n\nWith no servers, `keyfleet run` does everything in one \
process and keeps its registry in a local file (--state).\n\nExit status: 0 when every row was \
processed (failed rows are results, not crashes); 1 when the run itself failed (unreadable input, \
unwritable output, broken state file); 2 for bad flags or configuration; 130 when interrupted."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Config file (TOML). Default: ./keyfleet.toml when it exists.
    #[arg(long, global = true, env = "KEYFLEET_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Embedded state file (the registry of key pairs). Default: ./keyfleet.redb.
    #[arg(long, global = true, env = "KEYFLEET_STATE", value_name = "PATH")]
    pub state: Option<PathBuf>,
    /// Key pairs allowed per region (both clouds document 500).
    #[arg(long, global = true, env = "KEYFLEET_QUOTA", value_name = "N", value_parser = parse_quota)]
    pub quota: Option<u64>,
    /// Log filter (tracing syntax), e.g. `info`, `keyfleet=debug`.
    #[arg(
        long,
        global = true,
        env = "KEYFLEET_LOG",
        default_value = "warn",
        value_name = "FILTER"
    )]
    pub log: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a batch file through the whole pipeline in this process (no servers needed).
    Run(RunArgs),
    /// List registered key pairs (like DescribeKeyPairs).
    Describe(DescribeArgs),
    /// Delete key pairs by name, freeing their quota.
    Delete(DeleteArgs),
    /// Measure key-generation throughput on this machine.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Batch file: CSV whose header uses API parameter names (RegionId, KeyPairName, Tag.1.Key…;
    /// optional Provider and Owner columns), or JSON Lines of flat objects with the same names.
    pub file: PathBuf,
    /// Output folder: manifest.jsonl plus one private key file (0600) and .pub per created pair.
    #[arg(long, env = "KEYFLEET_OUT", value_name = "DIR")]
    pub out: PathBuf,
    /// Input format; by default from the extension (.csv, .jsonl/.ndjson).
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Provider of rows without a Provider column.
    #[arg(long, env = "KEYFLEET_PROVIDER", default_value = "aliyun", value_parser = parse_provider)]
    pub provider: Provider,
    /// Owner (Alibaba account / UCloud default project) of rows without an Owner column.
    #[arg(long, env = "KEYFLEET_OWNER", default_value = "default")]
    pub owner: String,
    /// RSA modulus size: 2048, 3072 or 4096. Default 2048 (or key_bits in the config file).
    #[arg(long, env = "KEYFLEET_KEY_BITS", value_name = "BITS", value_parser = parse_key_bits)]
    pub key_bits: Option<KeyBits>,
    /// Key-generation threads; 0 = one per core.
    #[arg(long, env = "KEYFLEET_THREADS", value_name = "N")]
    pub threads: Option<usize>,
    /// Prime engine.
    #[arg(long, env = "KEYFLEET_ENGINE", value_enum, default_value_t = Engine::Fast)]
    pub engine: Engine,
    /// Batch id (ties job ids to rows so a re-run after a crash resumes). Default: derived
    /// from the input file's absolute path.
    #[arg(long, env = "KEYFLEET_BATCH_ID")]
    pub batch_id: Option<String>,
    /// Progress display.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
    /// Print the summary as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DescribeArgs {
    #[arg(long, value_parser = parse_provider)]
    pub provider: Option<Provider>,
    /// Alibaba account / UCloud project.
    #[arg(long)]
    pub owner: Option<String>,
    #[arg(long)]
    pub region: Option<String>,
    /// Key pair name; `*` matches any run of characters.
    #[arg(long)]
    pub name: Option<String>,
    /// Fingerprint (the API's, the MD5 colon form, or SHA256:…).
    #[arg(long)]
    pub fingerprint: Option<String>,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    #[arg(long, default_value = "aliyun", value_parser = parse_provider)]
    pub provider: Provider,
    /// Alibaba account / UCloud project.
    #[arg(long, default_value = "default")]
    pub owner: String,
    #[arg(long)]
    pub region: String,
    /// Names of the key pairs to delete.
    #[arg(required = true)]
    pub names: Vec<String>,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Keys to generate per measurement.
    #[arg(long, default_value_t = 64)]
    pub keys: usize,
    /// Threads; 0 = one per core.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[arg(long, default_value = "2048", value_parser = parse_key_bits)]
    pub bits: KeyBits,
    #[arg(long, value_enum, default_value_t = Engine::Fast)]
    pub engine: Engine,
    /// Also measure `rsa`'s RsaPrivateKey::new side by side and report the ratio.
    #[arg(long)]
    pub compare: bool,
    /// Also run `keyfleet run` on a generated batch of --keys rows (temporary folder and state)
    /// and report its keys/s against raw generation.
    #[arg(long)]
    pub pipeline: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn parse_quota(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(n) if (1..=10_000_000).contains(&n) => Ok(n),
        _ => Err(format!(
            "'{s}' is not a quota: a whole number from 1 to 10000000 (--quota / KEYFLEET_QUOTA)"
        )),
    }
}

fn parse_key_bits(s: &str) -> Result<KeyBits, String> {
    s.parse::<KeyBits>()
        .map_err(|e| format!("{e} (--key-bits / KEYFLEET_KEY_BITS)"))
}

fn parse_provider(s: &str) -> Result<Provider, String> {
    s.parse::<Provider>()
}

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
    #[error("cannot read config file {path}: {source}")]
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
        if let Some(b) = cfg.key_bits {
            KeyBits::try_from(b).map_err(|e| bad("key_bits", b.to_string(), &e))?;
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

    /// The pipeline settings these sources add up to.
    pub fn settings(&self, global: &GlobalArgs, engine: Engine) -> Settings {
        let mut catalog = Catalog::default();
        if let Some(a) = &self.aliyun {
            if let Some(r) = &a.regions {
                catalog.aliyun_regions = r.clone();
            }
            if let Some(g) = &a.resource_groups {
                catalog.resource_groups = g.clone();
            }
        }
        if let Some(u) = &self.ucloud {
            if let Some(r) = &u.regions {
                catalog.ucloud_regions = r.clone();
            }
            if let Some(d) = &u.default_region {
                catalog.ucloud_default_region = d.clone();
            }
        }
        Settings {
            catalog,
            quota: Quota {
                default: global
                    .quota
                    .or(self.quota)
                    .unwrap_or(Quota::default().default),
                per_region: self.quota_per_region.clone(),
            },
            engine,
            ..Settings::default()
        }
    }

    pub fn state_path(&self, global: &GlobalArgs) -> PathBuf {
        global
            .state
            .clone()
            .or_else(|| self.state.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE))
    }

    pub fn key_bits(&self, flag: Option<KeyBits>) -> KeyBits {
        flag.or_else(|| self.key_bits.and_then(|b| KeyBits::try_from(b).ok()))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut global = GlobalArgs {
            config: None,
            state: None,
            quota: None,
            log: "warn".into(),
        };
        let s = cfg.settings(&global, Engine::Fast);
        assert_eq!(s.quota.for_region("cn-hangzhou"), 20);
        assert_eq!(s.quota.for_region("cn-beijing"), 5);
        assert!(s.catalog.resource_groups.contains("rg-a"));
        assert_eq!(cfg.key_bits(None), KeyBits::B3072);
        global.quota = Some(7);
        assert_eq!(cfg.settings(&global, Engine::Fast).quota.for_region("x"), 7);
    }
}
