//! Cloud access keys, in one file format for both sides: `keyfleet serve --credentials FILE`
//! (the keys its API accepts, and the account each acts as) and `--upstream-credentials FILE`
//! (the keys the upstream signs with, per owner). TOML:
//!
//! ```toml
//! [[aliyun]]
//! access_key_id = "testid"
//! access_key_secret = "testsecret"
//! account = "acme"            # the registry owner these keys act as
//! [[ucloud]]
//! public_key = "ucloudpub"
//! private_key = "ucloudpriv"
//! account = "org-acme"        # the default ProjectId when a request names none
//! ```
//!
//! The file holds secrets, so it is refused when group or others may read it, or when it is a
//! symbolic link; its secrets are zeroized when dropped and never printed (not even in a TOML
//! syntax error, which would quote the offending line).

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::dialect::{ucloud, Provider};

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read the credentials file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the credentials file {path} has mode {mode:04o}: group or others may read it, and it \
         holds secrets; run `chmod 600 {path}`"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("the credentials file {path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// A secret from the file: zeroized on drop, never shown.
#[derive(Clone)]
pub struct Secret(Zeroizing<String>);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| Secret(Zeroizing::new(s)))
    }
}

impl Secret {
    pub fn new(secret: String) -> Secret {
        Secret(Zeroizing::new(secret))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AliyunEntry {
    access_key_id: String,
    access_key_secret: Secret,
    account: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UcloudEntry {
    public_key: String,
    private_key: Secret,
    account: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileForm {
    #[serde(default)]
    aliyun: Vec<AliyunEntry>,
    #[serde(default)]
    ucloud: Vec<UcloudEntry>,
}

/// One access key: its secret and the account (Alibaba) or default project (UCloud) it acts as.
#[derive(Clone, Debug)]
pub struct AccessKey {
    pub provider: Provider,
    pub id: String,
    pub secret: Secret,
    pub account: String,
}

/// Every access key, by provider and id.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    keys: HashMap<(Provider, String), AccessKey>,
}

impl Credentials {
    /// Credentials made in code (benchmarks, tests); later duplicates replace earlier ones.
    pub fn from_keys(keys: Vec<AccessKey>) -> Credentials {
        Credentials {
            keys: keys
                .into_iter()
                .map(|k| ((k.provider, k.id.clone()), k))
                .collect(),
        }
    }

    pub fn get(&self, provider: Provider, id: &str) -> Option<&AccessKey> {
        self.keys.get(&(provider, id.to_owned()))
    }

    /// The key that acts as `account` for `provider` (the first by id, if several do).
    pub fn for_account(&self, provider: Provider, account: &str) -> Option<&AccessKey> {
        self.keys
            .values()
            .filter(|k| k.provider == provider && k.account == account)
            .min_by(|a, b| a.id.cmp(&b.id))
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// How many keys each provider has (for the start-up line).
    pub fn count(&self, provider: Provider) -> usize {
        self.keys.keys().filter(|(p, _)| *p == provider).count()
    }

    /// Reads and checks the file (see the module docs).
    pub fn load(path: &Path) -> Result<Credentials, CredentialsError> {
        let read = |source| CredentialsError::Read {
            path: path.to_owned(),
            source,
        };
        let invalid = |reason: String| CredentialsError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags_nofollow()
            .open(path)
            .map_err(read)?;
        let meta = file.metadata().map_err(read)?;
        if !meta.is_file() {
            return Err(invalid("not a regular file".into()));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(CredentialsError::TooOpen {
                path: path.to_owned(),
                mode,
            });
        }
        let mut text = Zeroizing::new(String::new());
        file.read_to_string(&mut text).map_err(read)?;
        let form: FileForm = toml::from_str(&text).map_err(|e| {
            // toml's Display quotes the offending line, which may hold a secret: say where only.
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            match line {
                Some(n) => invalid(format!("not the expected TOML at line {n}")),
                None => invalid("not the expected TOML".into()),
            }
        })?;
        let mut creds = Credentials::default();
        for e in form.aliyun {
            creds
                .add(
                    Provider::Aliyun,
                    e.access_key_id,
                    e.access_key_secret,
                    e.account,
                )
                .map_err(invalid)?;
        }
        for e in form.ucloud {
            if !ucloud::project_id_is_valid(&e.account) {
                return Err(invalid(format!(
                    "UCloud key {:?}: account {:?} is not a project id (1-64 of [A-Za-z0-9_-])",
                    e.public_key, e.account
                )));
            }
            creds
                .add(Provider::Ucloud, e.public_key, e.private_key, e.account)
                .map_err(invalid)?;
        }
        if creds.is_empty() {
            return Err(invalid(
                "it names no access keys: add an [[aliyun]] or [[ucloud]] entry".into(),
            ));
        }
        Ok(creds)
    }

    fn add(
        &mut self,
        provider: Provider,
        id: String,
        secret: Secret,
        account: String,
    ) -> Result<(), String> {
        if id.is_empty() || id.len() > 256 || id.chars().any(char::is_control) {
            return Err(format!(
                "a {provider} access key id is empty, too long or has control characters"
            ));
        }
        if secret.expose().is_empty() {
            return Err(format!("{provider} key {id:?} has an empty secret"));
        }
        if account.is_empty() || account.len() > 128 || account.chars().any(char::is_control) {
            return Err(format!(
                "{provider} key {id:?}: account must be 1-128 characters"
            ));
        }
        let key = AccessKey {
            provider,
            id: id.clone(),
            secret,
            account,
        };
        if self.keys.insert((provider, id.clone()), key).is_some() {
            return Err(format!("{provider} key {id:?} is listed twice"));
        }
        Ok(())
    }
}

/// `O_NOFOLLOW` on an `OpenOptions`: a symbolic link in place of the file is refused.
trait NoFollow {
    fn custom_flags_nofollow(&mut self) -> &mut Self;
}

impl NoFollow for std::fs::OpenOptions {
    fn custom_flags_nofollow(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(crate::sink::files::no_follow())
    }
}
