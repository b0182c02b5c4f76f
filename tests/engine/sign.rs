//! The request signatures of `keyfleet::sign` against every vector of the serve contract
//! (section 3) and against raw requests captured from the official SDKs.
//!
//! The captured requests below were sent by aliyun-python-sdk-core 2.16.1 + aliyun-python-sdk-ecs
//! 4.24.83 ("classic"), alibabacloud-ecs20140526 7.11.8 on alibabacloud-tea-openapi 0.4.6 /
//! darabonba-core 1.0.9 ("Tea", V3 by default, RPC v1 with `signature_algorithm = "v2"`) and
//! ucloud-sdk-python3 0.11.150 to a local server that logged them verbatim (method and target,
//! headers as sent, then the body). Fixed inputs: AccessKey testid/testsecret, nonce
//! 3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf and timestamp 2024-01-02T03:04:05Z (the SDKs' nonce and
//! clock helpers patched), RegionId cn-hangzhou, KeyPairName probe-kp, tags env=dev and
//! team="a b/c*~"; UCloud ucloudpub/ucloudpriv, Region cn-bj2, ProjectId org-abc123.
//!
//! The contract's captured Alibaba vectors (classic `my465c…`, Tea v1 `hQ3/…`, Tea V3 `5360c3…`)
//! depend on inputs the contract does not give (the key-pair name at least; V3 also signs the
//! SDK's user-agent), and were not reproduced; the requests captured here stand in for them.
//! The contract's captured UCloud vector was reproduced by the SDK itself (KeyPairName probe-kp,
//! Zone cn-bj2-05) and is checked below.

use keyfleet::sign::{acs3, ct_eq, pct, rpc, ucloud};

/// A captured request: method, target (path and query), headers as sent, body.
struct Captured {
    method: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    body: String,
}

impl Captured {
    fn parse(raw: &str) -> Self {
        let (head, body) = raw.split_once("\n\n").expect("head and body");
        let mut lines = head.lines();
        let (method, target) = lines
            .next()
            .and_then(|l| l.split_once(' '))
            .expect("request line");
        let query = target
            .split_once('?')
            .map(|(_, q)| decode(q))
            .unwrap_or_default();
        let headers = lines
            .map(|l| {
                let (n, v) = l.split_once(": ").expect("header line");
                (n.to_ascii_lowercase(), v.to_owned())
            })
            .collect();
        Captured {
            method: method.to_owned(),
            query,
            headers,
            body: body.to_owned(),
        }
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .expect("header present")
    }

    /// Query and form-body parameters together, decoded, as a server sees them.
    fn params(&self) -> Vec<(String, String)> {
        let mut all = self.query.clone();
        all.extend(decode(&self.body));
        all
    }
}

/// `application/x-www-form-urlencoded` decoding: `+` and `%20` both become a space.
fn decode(s: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(s.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> &'a str {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .expect("parameter present")
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn with(params: &[(String, String)], key: &str, value: &str) -> Vec<(String, String)> {
    params
        .iter()
        .map(|(k, v)| (k.clone(), if k == key { value.into() } else { v.clone() }))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Captured requests.

const CLASSIC_CREATE_KEY_PAIR: &str = r#"POST /?KeyPairName=probe-kp&Tag.1.Value=dev&Tag.1.Key=env&Tag.2.Value=a%20b%2Fc%2A~&Tag.2.Key=team&Version=2014-05-26&Action=CreateKeyPair&Format=JSON&RegionId=cn-hangzhou&Timestamp=2024-01-02T03%3A04%3A05Z&SignatureMethod=HMAC-SHA1&SignatureType=&SignatureVersion=1.0&SignatureNonce=3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf&AccessKeyId=testid&Signature=tD4QJCFmmy%2B5%2Bu2rmIO2DJ7xLqU%3D
Host: 127.0.0.1:18080
User-Agent: AlibabaCloud (Linux 6.18.44-fc-v669;x86_64) Python/3.11.7 Core/2.16.1 python-requests/2.18.3
Accept-Encoding: identity
Accept: */*
Connection: keep-alive
x-acs-action: CreateKeyPair
x-acs-version: 2014-05-26
x-sdk-invoke-type: normal
x-sdk-client: python/2.0.0
Content-Length: 0

"#;

const TEA_V1_CREATE_KEY_PAIR: &str = r#"POST /?Action=CreateKeyPair&Format=json&Version=2014-05-26&Timestamp=2024-01-02T03%3A04%3A05Z&SignatureNonce=3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf&KeyPairName=probe-kp&RegionId=cn-hangzhou&Tag.1.Key=env&Tag.1.Value=dev&Tag.2.Key=team&Tag.2.Value=a+b%2Fc%2A~&SignatureMethod=HMAC-SHA1&SignatureVersion=1.0&AccessKeyId=testid&Signature=FeH7wwJ9iQ4EQ2G%2FKYjMHCpu4Eo%3D
Accept-Encoding: identity
host: 127.0.0.1:18080
x-acs-version: 2014-05-26
x-acs-action: CreateKeyPair
user-agent: AlibabaCloud (Linux; x86_64) Python/3.11.7 Core/0.4.3 TeaDSL/2
x-acs-credentials-provider: static_ak
Content-Length: 0

"#;

const TEA_V3_CREATE_KEY_PAIR: &str = r#"POST /?KeyPairName=probe-kp&RegionId=cn-hangzhou&Tag.1.Key=env&Tag.1.Value=dev&Tag.2.Key=team&Tag.2.Value=a+b%2Fc%2A~
Accept-Encoding: identity
host: 127.0.0.1:18080
x-acs-version: 2014-05-26
x-acs-action: CreateKeyPair
user-agent: AlibabaCloud (Linux; x86_64) Python/3.11.7 Core/0.4.3 TeaDSL/2
x-acs-date: 2024-01-02T03:04:05Z
x-acs-signature-nonce: 3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf
accept: application/json
x-acs-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
x-acs-credentials-provider: static_ak
Authorization: ACS3-HMAC-SHA256 Credential=testid,SignedHeaders=accept;host;user-agent;x-acs-action;x-acs-content-sha256;x-acs-credentials-provider;x-acs-date;x-acs-signature-nonce;x-acs-version,Signature=671b31232cafea0b404f8d1e7269aa95e44ddd877f95f891036aaf45d7b173e8
Content-Length: 0

"#;

const CLASSIC_DESCRIBE_KEY_PAIRS: &str = r#"POST /?KeyPairName=%E5%AF%86%E9%92%A5%2A&PageSize=50&Version=2014-05-26&Action=DescribeKeyPairs&Format=JSON&RegionId=cn-hangzhou&Timestamp=2024-01-02T03%3A04%3A05Z&SignatureMethod=HMAC-SHA1&SignatureType=&SignatureVersion=1.0&SignatureNonce=3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf&AccessKeyId=testid&Signature=NM19cnHDhHzYfUU701Amm3SuWe4%3D
Host: 127.0.0.1:18080
User-Agent: AlibabaCloud (Linux 6.18.44-fc-v669;x86_64) Python/3.11.7 Core/2.16.1 python-requests/2.18.3
Accept-Encoding: identity
Accept: */*
Connection: keep-alive
x-acs-action: DescribeKeyPairs
x-acs-version: 2014-05-26
x-sdk-invoke-type: normal
x-sdk-client: python/2.0.0
Content-Length: 0

"#;

const TEA_V3_DESCRIBE_KEY_PAIRS: &str = r#"POST /?KeyPairName=%E5%AF%86%E9%92%A5%2A&PageSize=50&RegionId=cn-hangzhou
Accept-Encoding: identity
host: 127.0.0.1:18080
x-acs-version: 2014-05-26
x-acs-action: DescribeKeyPairs
user-agent: AlibabaCloud (Linux; x86_64) Python/3.11.7 Core/0.4.3 TeaDSL/2
x-acs-date: 2024-01-02T03:04:05Z
x-acs-signature-nonce: 3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf
accept: application/json
x-acs-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
x-acs-credentials-provider: static_ak
Authorization: ACS3-HMAC-SHA256 Credential=testid,SignedHeaders=accept;host;user-agent;x-acs-action;x-acs-content-sha256;x-acs-credentials-provider;x-acs-date;x-acs-signature-nonce;x-acs-version,Signature=59c5640951d009c540b2275253f4d8dce84eb7f0f22ac66f04eb60476491c0f7
Content-Length: 0

"#;

const UCLOUD_CREATE_UHOST_KEY_PAIR: &str = r#"POST /
Host: 127.0.0.1:18080
User-Agent: Python/3.11.7 Python-SDK/0.11.150Package/uhost
Accept-Encoding: gzip, deflate
Accept: */*
Connection: keep-alive
Content-Type: application/x-www-form-urlencoded
U-Timestamp-Ms: 1795983257017
Content-Length: 167

Region=cn-bj2&ProjectId=org-abc123&KeyPairName=probe-kp&Zone=cn-bj2-05&Action=CreateUHostKeyPair&PublicKey=ucloudpub&Signature=e9fd74a9bc0112053e8d211575a098d10046aeee"#;

const UCLOUD_DESCRIBE_UHOST_INSTANCE: &str = r#"POST /
Host: 127.0.0.1:18080
User-Agent: Python/3.11.7 Python-SDK/0.11.150Package/uhost
Accept-Encoding: gzip, deflate
Accept: */*
Connection: keep-alive
Content-Type: application/x-www-form-urlencoded
U-Timestamp-Ms: 1795983257020
Content-Length: 159

Region=cn-bj2&Limit=10&Action=DescribeUHostInstance&PublicKey=ucloudsomeone%40example.com1296235120854146120&Signature=cba5cf5ec4d4233d206b1b54951e3787350a642f"#;

// ---------------------------------------------------------------------------------------------
// Shared helpers.

#[test]
fn pct_is_rfc3986_with_upper_case_escapes() {
    assert_eq!(pct("密钥"), "%E5%AF%86%E9%92%A5");
    assert_eq!(pct("é"), "%C3%A9");
    assert_eq!(pct("*"), "%2A");
    assert_eq!(pct("~"), "~");
    assert_eq!(pct(" "), "%20");
    assert_eq!(pct("+"), "%2B");
    assert_eq!(pct("a b/c*~"), "a%20b%2Fc%2A~");
    assert_eq!(pct("AZaz09-_.~"), "AZaz09-_.~");
    assert_eq!(pct("=&%:@!'()"), "%3D%26%25%3A%40%21%27%28%29");
    assert_eq!(pct(""), "");
}

#[test]
fn ct_eq_compares_whole_slices() {
    assert!(ct_eq(b"abc", b"abc"));
    assert!(ct_eq(b"", b""));
    assert!(!ct_eq(b"abc", b"abd"));
    assert!(!ct_eq(b"abc", b"ab"));
    assert!(!ct_eq(b"", b"a"));
}

// ---------------------------------------------------------------------------------------------
// Alibaba RPC v1.

/// Checks a captured RPC request the way a server would: its `Signature` parameter must equal
/// the one computed from the other parameters.
fn rpc_verifies(raw: &str, secret: &str) -> bool {
    let req = Captured::parse(raw);
    let params = req.params();
    let sent = param(&params, "Signature");
    let sts = rpc::string_to_sign(&req.method, &params);
    ct_eq(rpc::signature(secret, &sts).as_bytes(), sent.as_bytes())
}

fn describe_regions() -> Vec<(String, String)> {
    pairs(&[
        ("AccessKeyId", "testid"),
        ("Action", "DescribeRegions"),
        ("Format", "XML"),
        ("SignatureMethod", "HMAC-SHA1"),
        ("SignatureNonce", "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf"),
        ("SignatureVersion", "1.0"),
        ("Timestamp", "2016-02-23T12:46:24Z"),
        ("Version", "2014-05-26"),
    ])
}

#[test]
fn rpc_documented_describe_regions() {
    let params = describe_regions();
    let sts = rpc::string_to_sign("GET", &params);
    assert_eq!(
        sts,
        "GET&%2F&AccessKeyId%3Dtestid%26Action%3DDescribeRegions%26Format%3DXML\
         %26SignatureMethod%3DHMAC-SHA1%26SignatureNonce%3D3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf\
         %26SignatureVersion%3D1.0%26Timestamp%3D2016-02-23T12%253A46%253A24Z\
         %26Version%3D2014-05-26"
    );
    assert_eq!(
        rpc::signature("testsecret", &sts),
        "OLeaidS1JvxuMvnyHOwuJ+uX5qY="
    );
}

#[test]
fn rpc_order_of_arrival_does_not_matter() {
    let mut params = describe_regions();
    params.reverse();
    let sts = rpc::string_to_sign("GET", &params);
    assert_eq!(
        rpc::signature("testsecret", &sts),
        "OLeaidS1JvxuMvnyHOwuJ+uX5qY="
    );
}

#[test]
fn rpc_classic_create_key_pair() {
    let req = Captured::parse(CLASSIC_CREATE_KEY_PAIR);
    let params = req.params();
    // The wire details the contract warns about, as this SDK really sends them.
    assert_eq!(param(&params, "SignatureType"), "");
    assert_eq!(param(&params, "Tag.2.Value"), "a b/c*~");
    assert!(req.query[0].0 == "KeyPairName" && req.body.is_empty());
    assert_eq!(
        rpc::signature("testsecret", &rpc::string_to_sign("POST", &params)),
        "tD4QJCFmmy+5+u2rmIO2DJ7xLqU="
    );
    assert!(rpc_verifies(CLASSIC_CREATE_KEY_PAIR, "testsecret"));
}

#[test]
fn rpc_tea_v1_create_key_pair() {
    let req = Captured::parse(TEA_V1_CREATE_KEY_PAIR);
    let params = req.params();
    assert_eq!(param(&params, "Format"), "json");
    // Tea writes the space as `+`; decoded it is the same value the classic SDK sent as `%20`.
    assert!(req.query.iter().any(|(_, v)| v == "a b/c*~"));
    assert_eq!(
        rpc::signature("testsecret", &rpc::string_to_sign("POST", &params)),
        "FeH7wwJ9iQ4EQ2G/KYjMHCpu4Eo="
    );
    assert!(rpc_verifies(TEA_V1_CREATE_KEY_PAIR, "testsecret"));
}

#[test]
fn rpc_classic_describe_key_pairs_with_chinese_name() {
    let params = Captured::parse(CLASSIC_DESCRIBE_KEY_PAIRS).params();
    assert_eq!(param(&params, "KeyPairName"), "密钥*");
    assert!(
        rpc::canonical_query(&params).starts_with("AccessKeyId=testid&Action=DescribeKeyPairs&")
    );
    assert!(rpc::canonical_query(&params).contains("&KeyPairName=%E5%AF%86%E9%92%A5%2A&"));
    assert!(rpc_verifies(CLASSIC_DESCRIBE_KEY_PAIRS, "testsecret"));
}

#[test]
fn rpc_canonical_query_leaves_out_signature_and_sorts_by_bytes() {
    let params = pairs(&[
        ("b", "2"),
        ("Signature", "anything"),
        ("a", "y"),
        ("Tag.10.Key", "x"),
        ("a", "x"),
        ("Tag.2.Key", "z z"),
        ("B", "1"),
    ]);
    // Byte order: upper case before lower case, "Tag.1…" before "Tag.2…"; ties by value.
    assert_eq!(
        rpc::canonical_query(&params),
        "B=1&Tag.10.Key=x&Tag.2.Key=z%20z&a=x&a=y&b=2"
    );
    assert_eq!(rpc::canonical_query(&[]), "");
}

#[test]
fn rpc_signature_changes_with_any_input() {
    let params = describe_regions();
    let good = "OLeaidS1JvxuMvnyHOwuJ+uX5qY=";
    let sig = |method: &str, params: &[(String, String)], secret: &str| {
        rpc::signature(secret, &rpc::string_to_sign(method, params))
    };
    assert_eq!(sig("GET", &params, "testsecret"), good);
    assert_ne!(sig("POST", &params, "testsecret"), good);
    assert_ne!(sig("GET", &params, "testsecreT"), good);
    assert_ne!(
        sig(
            "GET",
            &with(&params, "Action", "DescribeRegionz"),
            "testsecret"
        ),
        good
    );
    let mut more = params.clone();
    more.push(("RegionId".into(), "cn-hangzhou".into()));
    assert_ne!(sig("GET", &more, "testsecret"), good);
    // The Signature parameter itself is not signed: a server can pass every parameter in.
    let mut signed = params.clone();
    signed.push(("Signature".into(), good.into()));
    assert_eq!(sig("GET", &signed, "testsecret"), good);
    // A tampered captured request no longer verifies.
    let tampered = CLASSIC_CREATE_KEY_PAIR.replace("KeyPairName=probe-kp", "KeyPairName=probe-kq");
    assert!(!rpc_verifies(&tampered, "testsecret"));
    assert!(!rpc_verifies(CLASSIC_CREATE_KEY_PAIR, "othersecret"));
}

// ---------------------------------------------------------------------------------------------
// Alibaba V3, ACS3-HMAC-SHA256.

/// Verifies a captured V3 request the way a server would and returns the signature computed.
fn acs3_signature(raw: &str, secret: &str) -> Result<String, acs3::MissingHeader> {
    let req = Captured::parse(raw);
    let auth = acs3::parse_authorization(req.header("authorization")).expect("well-formed");
    assert_eq!(auth.algorithm, acs3::ALGORITHM);
    assert_eq!(
        req.header("x-acs-content-sha256"),
        acs3::content_sha256(req.body.as_bytes())
    );
    let cr = acs3::canonical_request(
        &req.method,
        &req.query,
        &req.headers,
        &auth.signed_headers,
        req.header("x-acs-content-sha256"),
    )?;
    Ok(acs3::signature(secret, &acs3::string_to_sign(&cr)))
}

fn acs3_verifies(raw: &str, secret: &str) -> bool {
    let req = Captured::parse(raw);
    let auth = acs3::parse_authorization(req.header("authorization")).expect("well-formed");
    match acs3_signature(raw, secret) {
        Ok(sig) => ct_eq(sig.as_bytes(), auth.signature.as_bytes()),
        Err(_) => false,
    }
}

type Pairs = Vec<(String, String)>;

/// The documented RunInstances request: query, headers, signed header names.
fn run_instances() -> (Pairs, Pairs, Vec<String>) {
    let query = pairs(&[
        (
            "ImageId",
            "win2019_1809_x64_dtc_zh-cn_40G_alibase_20230811.vhd",
        ),
        ("RegionId", "cn-shanghai"),
    ]);
    let headers = pairs(&[
        ("host", "ecs.cn-shanghai.aliyuncs.com"),
        ("x-acs-action", "RunInstances"),
        (
            "x-acs-content-sha256",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ),
        ("x-acs-date", "2023-10-26T10:22:32Z"),
        ("x-acs-signature-nonce", "3156853299f313e23d1673dc12e1703d"),
        ("x-acs-version", "2014-05-26"),
    ]);
    let signed = headers.iter().map(|(n, _)| n.clone()).collect();
    (query, headers, signed)
}

const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
const RUN_INSTANCES_SIGNATURE: &str =
    "06563a9e1b43f5dfe96b81484da74bceab24a1d853912eee15083a6f0f3283c0";

#[test]
fn acs3_documented_run_instances() {
    let (query, headers, signed) = run_instances();
    let cr = acs3::canonical_request("POST", &query, &headers, &signed, EMPTY_SHA256)
        .expect("all signed headers present");
    assert_eq!(
        cr,
        "POST\n/\n\
         ImageId=win2019_1809_x64_dtc_zh-cn_40G_alibase_20230811.vhd&RegionId=cn-shanghai\n\
         host:ecs.cn-shanghai.aliyuncs.com\n\
         x-acs-action:RunInstances\n\
         x-acs-content-sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n\
         x-acs-date:2023-10-26T10:22:32Z\n\
         x-acs-signature-nonce:3156853299f313e23d1673dc12e1703d\n\
         x-acs-version:2014-05-26\n\
         \n\
         host;x-acs-action;x-acs-content-sha256;x-acs-date;x-acs-signature-nonce;x-acs-version\n\
         e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    let sts = acs3::string_to_sign(&cr);
    assert!(sts.starts_with("ACS3-HMAC-SHA256\n") && sts.len() == 17 + 64);
    assert_eq!(
        acs3::signature("YourAccessKeySecret", &sts),
        RUN_INSTANCES_SIGNATURE
    );
}

#[test]
fn acs3_tea_create_key_pair() {
    let req = Captured::parse(TEA_V3_CREATE_KEY_PAIR);
    // Tea V3 puts Action and Version in headers, not in the query.
    assert!(req
        .query
        .iter()
        .all(|(k, _)| k != "Action" && k != "Version"));
    let auth = acs3::parse_authorization(req.header("authorization")).expect("well-formed");
    assert_eq!(auth.access_key_id, "testid");
    assert_eq!(
        auth.signed_headers.join(";"),
        "accept;host;user-agent;x-acs-action;x-acs-content-sha256;\
         x-acs-credentials-provider;x-acs-date;x-acs-signature-nonce;x-acs-version"
    );
    assert_eq!(
        acs3_signature(TEA_V3_CREATE_KEY_PAIR, "testsecret").expect("headers present"),
        "671b31232cafea0b404f8d1e7269aa95e44ddd877f95f891036aaf45d7b173e8"
    );
    assert!(acs3_verifies(TEA_V3_CREATE_KEY_PAIR, "testsecret"));
}

#[test]
fn acs3_tea_describe_key_pairs_with_chinese_name() {
    let req = Captured::parse(TEA_V3_DESCRIBE_KEY_PAIRS);
    assert_eq!(param(&req.query, "KeyPairName"), "密钥*");
    assert!(acs3_verifies(TEA_V3_DESCRIBE_KEY_PAIRS, "testsecret"));
}

#[test]
fn acs3_signature_changes_with_any_input() {
    let (query, headers, signed) = run_instances();
    let sig =
        |query: &[(String, String)], headers: &[(String, String)], signed: &[String], secret| {
            let cr = acs3::canonical_request("POST", query, headers, signed, EMPTY_SHA256)
                .expect("all signed headers present");
            acs3::signature(secret, &acs3::string_to_sign(&cr))
        };
    let secret = "YourAccessKeySecret";
    assert_eq!(
        sig(&query, &headers, &signed, secret),
        RUN_INSTANCES_SIGNATURE
    );
    assert_ne!(
        sig(&query, &headers, &signed, "YourAccessKeySecreT"),
        RUN_INSTANCES_SIGNATURE
    );
    assert_ne!(
        sig(
            &with(&query, "RegionId", "cn-beijing"),
            &headers,
            &signed,
            secret
        ),
        RUN_INSTANCES_SIGNATURE
    );
    assert_ne!(
        sig(
            &query,
            &with(&headers, "x-acs-action", "DeleteInstances"),
            &signed,
            secret
        ),
        RUN_INSTANCES_SIGNATURE
    );
    // An unsigned header may change; a signed one read in another order may not.
    let mut extra = headers.clone();
    extra.push(("user-agent".into(), "anything".into()));
    assert_eq!(
        sig(&query, &extra, &signed, secret),
        RUN_INSTANCES_SIGNATURE
    );
    let mut reordered = signed.clone();
    reordered.swap(0, 1);
    assert_ne!(
        sig(&query, &headers, &reordered, secret),
        RUN_INSTANCES_SIGNATURE
    );
    // Header values are trimmed; query order does not matter.
    let padded = with(&headers, "x-acs-action", "  RunInstances\t");
    let mut reversed = query.clone();
    reversed.reverse();
    assert_eq!(
        sig(&reversed, &padded, &signed, secret),
        RUN_INSTANCES_SIGNATURE
    );
    // V3 signs every query parameter, even one named Signature.
    let mut stray = query.clone();
    stray.push(("Signature".into(), "x".into()));
    assert_ne!(
        sig(&stray, &headers, &signed, secret),
        RUN_INSTANCES_SIGNATURE
    );
    // The body hash is signed.
    let cr = acs3::canonical_request(
        "POST",
        &query,
        &headers,
        &signed,
        &acs3::content_sha256(b"{}"),
    )
    .expect("all signed headers present");
    assert_ne!(
        acs3::signature(secret, &acs3::string_to_sign(&cr)),
        RUN_INSTANCES_SIGNATURE
    );
    // A captured request with a changed header does not verify.
    let tampered = TEA_V3_CREATE_KEY_PAIR.replace(
        "x-acs-action: CreateKeyPair",
        "x-acs-action: DeleteKeyPairs",
    );
    assert!(!acs3_verifies(&tampered, "testsecret"));
    assert!(!acs3_verifies(TEA_V3_CREATE_KEY_PAIR, "othersecret"));
}

#[test]
fn acs3_signed_header_missing_from_request_is_an_error() {
    let (query, headers, mut signed) = run_instances();
    signed.push("x-acs-security-token".into());
    let err = acs3::canonical_request("POST", &query, &headers, &signed, EMPTY_SHA256)
        .expect_err("header absent");
    assert_eq!(err.name, "x-acs-security-token");
    // Names are matched exactly: the caller passes lower-case names, as the SDKs sign them.
    let upper = vec!["Host".to_string()];
    assert!(acs3::canonical_request("POST", &query, &headers, &upper, EMPTY_SHA256).is_err());
    // A captured request stripped of a signed header cannot be verified.
    let stripped = TEA_V3_CREATE_KEY_PAIR.replace("x-acs-credentials-provider: static_ak\n", "");
    assert!(acs3_signature(&stripped, "testsecret").is_err());
}

#[test]
fn acs3_repeated_signed_header_signs_all_its_values() {
    let (query, mut headers, signed) = run_instances();
    headers.push(("x-acs-action".into(), "DeleteInstances".into()));
    let cr = acs3::canonical_request("POST", &query, &headers, &signed, EMPTY_SHA256)
        .expect("all signed headers present");
    assert!(cr.contains("\nx-acs-action:RunInstances,DeleteInstances\n"));
}

#[test]
fn acs3_content_sha256() {
    assert_eq!(acs3::content_sha256(b""), EMPTY_SHA256);
    assert_eq!(
        acs3::content_sha256(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn acs3_parse_authorization_reads_the_sdk_forms() {
    let auth = acs3::parse_authorization(
        "ACS3-HMAC-SHA256 Credential=YourAccessKeyId,SignedHeaders=host;x-acs-action,Signature=abc",
    )
    .expect("well-formed");
    assert_eq!(
        auth,
        acs3::Authorization {
            algorithm: "ACS3-HMAC-SHA256".into(),
            access_key_id: "YourAccessKeyId".into(),
            signed_headers: vec!["host".into(), "x-acs-action".into()],
            signature: "abc".into(),
        }
    );
    // Spaces after the commas, parts in another order.
    let spaced = acs3::parse_authorization(
        "ACS3-HMAC-SHA256  Signature=abc, Credential=YourAccessKeyId,  SignedHeaders=host;x-acs-action",
    )
    .expect("well-formed");
    assert_eq!(spaced, auth);
    // Other ACS3 algorithms are read, for the caller to refuse by name.
    let sm3 =
        acs3::parse_authorization("ACS3-HMAC-SM3 Credential=a,SignedHeaders=host,Signature=b")
            .expect("well-formed");
    assert_eq!(sm3.algorithm, "ACS3-HMAC-SM3");
    assert_ne!(sm3.algorithm, acs3::ALGORITHM);
}

#[test]
fn acs3_parse_authorization_refuses_malformed_headers() {
    use acs3::MalformedAuthorization as E;
    let cases: &[(&str, E)] = &[
        ("", E::NotAcs3),
        ("ACS3-HMAC-SHA256", E::NotAcs3),
        ("Bearer abc", E::NotAcs3),
        (
            "ACS3- Credential=a,SignedHeaders=host,Signature=b",
            E::NotAcs3,
        ),
        (
            "HMAC-SHA256 Credential=a,SignedHeaders=host,Signature=b",
            E::NotAcs3,
        ),
        (
            "ACS3-HMAC-SHA256 SignedHeaders=host,Signature=b",
            E::Missing("Credential"),
        ),
        (
            "ACS3-HMAC-SHA256 Credential=a,Signature=b",
            E::Missing("SignedHeaders"),
        ),
        (
            "ACS3-HMAC-SHA256 Credential=a,SignedHeaders=host",
            E::Missing("Signature"),
        ),
        (
            "ACS3-HMAC-SHA256 Credential=,SignedHeaders=host,Signature=b",
            E::Empty("Credential"),
        ),
        (
            "ACS3-HMAC-SHA256 Credential=a,SignedHeaders=,Signature=b",
            E::Empty("SignedHeaders"),
        ),
        (
            "ACS3-HMAC-SHA256 Credential=a,SignedHeaders=host,Signature=",
            E::Empty("Signature"),
        ),
        (
            "ACS3-HMAC-SHA256 Credential=a,SignedHeaders=host;;x-acs-date,Signature=b",
            E::Empty("SignedHeaders entry"),
        ),
        (
            "ACS3-HMAC-SHA256 Credential=a,SignedHeaders=host;,Signature=b",
            E::Empty("SignedHeaders entry"),
        ),
        (
            "ACS3-HMAC-SHA256 Credential=a,Credential=c,SignedHeaders=host,Signature=b",
            E::Repeated("Credential"),
        ),
        (
            "ACS3-HMAC-SHA256 Credential=a,SignedHeaders=host,Signature=b,Extra=1",
            E::UnknownPart("Extra=1".into()),
        ),
        (
            "ACS3-HMAC-SHA256 Credential=a,SignedHeaders=host,Signature=b,",
            E::UnknownPart("".into()),
        ),
        (
            "ACS3-HMAC-SHA256 Credential=a SignedHeaders=host Signature=b",
            E::Missing("SignedHeaders"),
        ),
    ];
    for (header, want) in cases {
        assert_eq!(
            acs3::parse_authorization(header).as_ref(),
            Err(want),
            "{header:?}"
        );
    }
}

#[test]
fn acs3_authorization_header_round_trips() {
    let (query, headers, signed) = run_instances();
    let cr = acs3::canonical_request("POST", &query, &headers, &signed, EMPTY_SHA256)
        .expect("all signed headers present");
    let sig = acs3::signature("YourAccessKeySecret", &acs3::string_to_sign(&cr));
    let header = acs3::authorization_header("YourAccessKeyId", &signed, &sig);
    assert_eq!(
        header,
        format!(
            "ACS3-HMAC-SHA256 Credential=YourAccessKeyId,SignedHeaders=host;x-acs-action;\
             x-acs-content-sha256;x-acs-date;x-acs-signature-nonce;x-acs-version,\
             Signature={RUN_INSTANCES_SIGNATURE}"
        )
    );
    let auth = acs3::parse_authorization(&header).expect("well-formed");
    assert_eq!(auth.access_key_id, "YourAccessKeyId");
    assert_eq!(auth.signed_headers, signed);
    assert_eq!(auth.signature, RUN_INSTANCES_SIGNATURE);
}

// ---------------------------------------------------------------------------------------------
// UCloud.

fn ucloud_verifies(raw: &str, private_key: &str) -> bool {
    let params = Captured::parse(raw).params();
    let sent = param(&params, "Signature");
    ct_eq(
        ucloud::signature(&params, private_key).as_bytes(),
        sent.as_bytes(),
    )
}

const DOC_PRIVATE_KEY: &str = "46f09bb9fab4f12dfc160dae12273d5332b5debe";

fn describe_uhost_instance() -> Vec<(String, String)> {
    pairs(&[
        ("Action", "DescribeUHostInstance"),
        ("Region", "cn-bj2"),
        ("Limit", "10"),
        ("PublicKey", "ucloudsomeone@example.com1296235120854146120"),
    ])
}

#[test]
fn ucloud_documented_describe_uhost_instance() {
    let params = describe_uhost_instance();
    assert_eq!(
        ucloud::string_to_sign(&params, DOC_PRIVATE_KEY),
        "ActionDescribeUHostInstanceLimit10PublicKeyucloudsomeone@example.com1296235120854146120\
         Regioncn-bj246f09bb9fab4f12dfc160dae12273d5332b5debe"
    );
    assert_eq!(
        ucloud::signature(&params, DOC_PRIVATE_KEY),
        "cba5cf5ec4d4233d206b1b54951e3787350a642f"
    );
    // The SDK, given the documented inputs, sends exactly the documented signature.
    assert!(ucloud_verifies(
        UCLOUD_DESCRIBE_UHOST_INSTANCE,
        DOC_PRIVATE_KEY
    ));
}

#[test]
fn ucloud_captured_create_uhost_key_pair() {
    let params = Captured::parse(UCLOUD_CREATE_UHOST_KEY_PAIR).params();
    assert_eq!(
        ucloud::signature(&params, "ucloudpriv"),
        "e9fd74a9bc0112053e8d211575a098d10046aeee"
    );
    assert!(ucloud_verifies(UCLOUD_CREATE_UHOST_KEY_PAIR, "ucloudpriv"));
}

#[test]
fn ucloud_signature_changes_with_any_input() {
    let params = describe_uhost_instance();
    let good = "cba5cf5ec4d4233d206b1b54951e3787350a642f";
    let mut reversed = params.clone();
    reversed.reverse();
    assert_eq!(ucloud::signature(&reversed, DOC_PRIVATE_KEY), good);
    let mut signed = params.clone();
    signed.push(("Signature".into(), good.into()));
    assert_eq!(ucloud::signature(&signed, DOC_PRIVATE_KEY), good);
    assert_ne!(
        ucloud::signature(&params, "46f09bb9fab4f12dfc160dae12273d5332b5debf"),
        good
    );
    assert_ne!(
        ucloud::signature(&with(&params, "Limit", "11"), DOC_PRIVATE_KEY),
        good
    );
    assert_ne!(
        ucloud::signature(&with(&params, "PublicKey", "someone-else"), DOC_PRIVATE_KEY),
        good
    );
    let mut more = params.clone();
    more.push(("ProjectId".into(), "org-abc123".into()));
    assert_ne!(ucloud::signature(&more, DOC_PRIVATE_KEY), good);
    let tampered =
        UCLOUD_CREATE_UHOST_KEY_PAIR.replace("KeyPairName=probe-kp", "KeyPairName=probe-kq");
    assert!(!ucloud_verifies(&tampered, "ucloudpriv"));
    assert!(!ucloud_verifies(UCLOUD_CREATE_UHOST_KEY_PAIR, "otherpriv"));
}

#[test]
fn ucloud_string_to_sign_matches_signature() {
    use sha1::{Digest, Sha1};
    let params = Captured::parse(UCLOUD_CREATE_UHOST_KEY_PAIR).params();
    let sts = ucloud::string_to_sign(&params, "ucloudpriv");
    assert!(sts.ends_with("ucloudpriv") && !sts.contains("Signature"));
    assert_eq!(
        hex::encode(Sha1::digest(sts.as_bytes())),
        ucloud::signature(&params, "ucloudpriv")
    );
}
