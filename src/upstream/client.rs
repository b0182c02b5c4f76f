//! A signing client for the key-pair APIs: Alibaba RPC (HMAC-SHA1), Alibaba V3
//! (`ACS3-HMAC-SHA256`) and UCloud, over HTTP or HTTPS (rustls, the system's roots). `keyfleet bench --serve` and the tests drive
//! `keyfleet serve` with it, signing exactly as the official SDKs do (`sign/`).

use std::time::Duration;

use crate::sign;

/// Who signs, and how.
#[derive(Clone)]
pub enum Signer {
    AliyunRpc {
        id: String,
        secret: String,
    },
    AliyunV3 {
        id: String,
        secret: String,
    },
    Ucloud {
        public_key: String,
        private_key: String,
    },
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Signer::AliyunRpc { id, .. } => write!(f, "AliyunRpc({id})"),
            Signer::AliyunV3 { id, .. } => write!(f, "AliyunV3({id})"),
            Signer::Ucloud { public_key, .. } => write!(f, "Ucloud({public_key})"),
        }
    }
}

/// What a test may fix instead of the defaults (now, a fresh nonce, JSON).
#[derive(Clone, Debug, Default)]
pub struct CallOptions {
    pub timestamp: Option<String>,
    pub nonce: Option<String>,
    /// Alibaba `Format` (RPC default here: JSON).
    pub format: Option<String>,
    pub version: Option<String>,
    /// Sign with this method name instead of HMAC-SHA1 (RPC).
    pub signature_method: Option<String>,
    /// Send this signature instead of the computed one.
    pub signature: Option<String>,
    /// GET with everything in the query string instead of a POST form.
    pub get: bool,
}

/// An answer: HTTP status and body.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    /// `x-acs-retry-after` (milliseconds) or `Retry-After` (seconds), when the server sent one.
    pub retry_after: Option<Duration>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

#[derive(Clone, Debug)]
pub struct ApiClient {
    http: reqwest::Client,
    /// `http://host:port`
    base: String,
    host: String,
}

impl ApiClient {
    /// Plain HTTP to `host_port` like `127.0.0.1:8080`.
    pub fn new(host_port: &str) -> Result<ApiClient, reqwest::Error> {
        ApiClient::with_base("http", host_port)
    }

    /// `scheme` `http` or `https`; `authority` `host` or `host:port`, as the `Host` header
    /// will carry it (and V3 signs it).
    pub fn with_base(scheme: &str, authority: &str) -> Result<ApiClient, reqwest::Error> {
        // rustls on ring, the provider the rest of keyfleet (lapin) uses; a second install is
        // refused harmlessly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Ok(ApiClient {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()?,
            base: format!("{scheme}://{authority}/"),
            host: authority.to_owned(),
        })
    }

    pub async fn call(
        &self,
        signer: &Signer,
        action: &str,
        params: &[(&str, &str)],
    ) -> Result<Reply, reqwest::Error> {
        self.call_with(signer, action, params, &CallOptions::default())
            .await
    }

    pub async fn call_with(
        &self,
        signer: &Signer,
        action: &str,
        params: &[(&str, &str)],
        opts: &CallOptions,
    ) -> Result<Reply, reqwest::Error> {
        let owned = |kv: &[(&str, &str)]| -> Vec<(String, String)> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let now = || humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let nonce = opts
            .nonce
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        let request = match signer {
            Signer::AliyunRpc { id, secret } => {
                let mut all = owned(params);
                all.extend(owned(&[
                    ("Action", action),
                    ("Version", opts.version.as_deref().unwrap_or("2014-05-26")),
                    ("AccessKeyId", id),
                    (
                        "SignatureMethod",
                        opts.signature_method.as_deref().unwrap_or("HMAC-SHA1"),
                    ),
                    ("SignatureVersion", "1.0"),
                    ("SignatureNonce", &nonce),
                    ("Format", opts.format.as_deref().unwrap_or("JSON")),
                ]));
                all.push((
                    "Timestamp".into(),
                    opts.timestamp.clone().unwrap_or_else(now),
                ));
                let method = if opts.get { "GET" } else { "POST" };
                let sts = sign::rpc::string_to_sign(method, &all);
                let sig = opts
                    .signature
                    .clone()
                    .unwrap_or_else(|| sign::rpc::signature(secret, &sts));
                all.push(("Signature".into(), sig));
                if opts.get {
                    self.http.get(format!("{}?{}", self.base, encode(&all)))
                } else {
                    self.form(&all)
                }
            }
            Signer::AliyunV3 { id, secret } => {
                let query = owned(params);
                let content = sign::acs3::content_sha256(b"");
                let date = opts.timestamp.clone().unwrap_or_else(now);
                let headers: Vec<(String, String)> = owned(&[
                    ("host", &self.host),
                    ("x-acs-action", action),
                    ("x-acs-content-sha256", &content),
                    ("x-acs-date", &date),
                    ("x-acs-signature-nonce", &nonce),
                    (
                        "x-acs-version",
                        opts.version.as_deref().unwrap_or("2014-05-26"),
                    ),
                ]);
                let signed: Vec<String> = headers.iter().map(|(k, _)| k.clone()).collect();
                let canonical =
                    sign::acs3::canonical_request("POST", &query, &headers, &signed, &content)
                        .unwrap_or_default();
                let sts = sign::acs3::string_to_sign(&canonical);
                let sig = opts
                    .signature
                    .clone()
                    .unwrap_or_else(|| sign::acs3::signature(secret, &sts));
                let mut rb = self.http.post(format!("{}?{}", self.base, encode(&query)));
                for (k, v) in headers.iter().filter(|(k, _)| k != "host") {
                    rb = rb.header(k.as_str(), v.as_str());
                }
                rb.header(
                    "authorization",
                    sign::acs3::authorization_header(id, &signed, &sig),
                )
            }
            Signer::Ucloud {
                public_key,
                private_key,
            } => {
                let mut all = owned(params);
                all.push(("Action".into(), action.into()));
                all.push(("PublicKey".into(), public_key.clone()));
                let sig = opts
                    .signature
                    .clone()
                    .unwrap_or_else(|| sign::ucloud::signature(&all, private_key));
                all.push(("Signature".into(), sig));
                self.form(&all)
            }
        };
        let response = request.send().await?;
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let retry_after = header("x-acs-retry-after")
            .map(Duration::from_millis)
            .or_else(|| header("retry-after").map(Duration::from_secs))
            .map(|d| d.min(Duration::from_secs(60)));
        let body = response.text().await?;
        Ok(Reply {
            status,
            body,
            retry_after,
        })
    }

    fn form(&self, params: &[(String, String)]) -> reqwest::RequestBuilder {
        self.http
            .post(&self.base)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(encode(params))
    }
}

fn encode(params: &[(String, String)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        s.append_pair(k, v);
    }
    s.finish()
}
