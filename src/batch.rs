//! Batch files: CSV with API parameter names as the header, or JSON Lines with one flat object
//! per line. Rows are streamed (never the whole file in memory); a row that cannot be read
//! becomes a failed entry naming its line, and the rest goes on.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::dialect::Provider;
use crate::job::{Job, MESSAGE_VERSION};
use crate::keygen::KeyBits;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Csv,
    Jsonl,
}

impl Format {
    /// `.csv` → CSV, `.jsonl` / `.ndjson` / `.json` → JSON Lines.
    pub fn from_path(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "csv" => Some(Format::Csv),
            "jsonl" | "ndjson" | "json" => Some(Format::Jsonl),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("cannot read batch file {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot tell the format of {0}: name it .csv or .jsonl, or pass --format csv|jsonl")]
    UnknownFormat(PathBuf),
    #[error("{path}: the CSV header cannot be read: {reason}")]
    Header { path: PathBuf, reason: String },
    #[error("{path}: the CSV header has no KeyPairName column")]
    NoNameColumn { path: PathBuf },
    #[error("{path} is empty: a CSV batch starts with a header line naming its columns (e.g. RegionId,KeyPairName)")]
    Empty { path: PathBuf },
}

/// Defaults for columns a row leaves out.
#[derive(Clone, Debug)]
pub struct RowDefaults {
    pub batch_id: String,
    pub provider: Provider,
    pub owner: String,
    pub key_bits: KeyBits,
}

/// One row of a batch: a job, or why the row is not one.
#[derive(Debug)]
pub enum Row {
    Job(Job),
    Bad(BadRow),
}

/// A row that is not a job (bad quoting, a wrong field count, an unknown provider).
#[derive(Debug)]
pub struct BadRow {
    pub batch_id: String,
    pub line: u64,
    pub provider: Provider,
    pub owner: String,
    pub reason: String,
}

impl BadRow {
    fn row(line: u64, provider: Provider, owner: String, reason: String, d: &RowDefaults) -> Row {
        Row::Bad(BadRow {
            batch_id: d.batch_id.clone(),
            line,
            provider,
            owner,
            reason,
        })
    }

    /// The row's answer: a failed result naming the line and what is wrong with it.
    pub fn into_result(self) -> crate::job::JobResult {
        crate::job::JobResult::rejected_row(
            &self.batch_id,
            self.line,
            self.provider,
            &self.owner,
            &self.reason,
        )
    }
}

/// Job ids are derived from the batch id and the line, so a re-run of the same batch after a
/// crash finds its own undelivered key pairs and replaces them instead of failing.
pub fn job_id(batch_id: &str, line: u64) -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("keyfleet:{batch_id}:{line}").as_bytes(),
    )
}

/// Columns that are keyfleet's own, not API parameters.
const PROVIDER_COL: &str = "Provider";
const OWNER_COL: &str = "Owner";

fn build_row(line: u64, mut params: BTreeMap<String, String>, defaults: &RowDefaults) -> Row {
    let owner = match params.remove(OWNER_COL) {
        Some(o) if !o.trim().is_empty() => o.trim().to_owned(),
        _ => defaults.owner.clone(),
    };
    let provider = match params.remove(PROVIDER_COL) {
        Some(p) if !p.trim().is_empty() => match p.parse::<Provider>() {
            Ok(p) => p,
            Err(e) => {
                return BadRow::row(
                    line,
                    defaults.provider,
                    owner,
                    format!("line {line}: column Provider: {e}"),
                    defaults,
                )
            }
        },
        _ => defaults.provider,
    };
    Row::Job(Job {
        v: MESSAGE_VERSION,
        job_id: job_id(&defaults.batch_id, line),
        batch_id: defaults.batch_id.clone(),
        line: Some(line),
        provider,
        owner,
        params,
        key_bits: defaults.key_bits,
    })
}

/// The path that means standard input.
pub const STDIN: &str = "-";

/// A batch opened once — a file, a FIFO, or standard input (`-`) — with its CSV header already
/// read and checked, so a bad input fails before anything is created.
pub struct BatchInput {
    path: PathBuf,
    format: Format,
    lines: Box<dyn BufRead + Send>,
    /// Physical lines consumed so far (the header's included).
    line: u64,
    headers: Vec<String>,
}

impl BatchInput {
    pub fn open(path: &Path, format: Option<Format>) -> Result<BatchInput, BatchError> {
        let stdin = path.as_os_str() == STDIN;
        let format = format
            .or_else(|| Format::from_path(path))
            .ok_or_else(|| BatchError::UnknownFormat(path.to_owned()))?;
        let lines: Box<dyn BufRead + Send> = if stdin {
            Box::new(BufReader::new(std::io::stdin()))
        } else {
            let file = File::open(path).map_err(|source| BatchError::Io {
                path: path.to_owned(),
                source,
            })?;
            Box::new(BufReader::with_capacity(1 << 16, file))
        };
        let mut input = BatchInput {
            path: path.to_owned(),
            format,
            lines,
            line: 0,
            headers: Vec::new(),
        };
        if format == Format::Csv {
            input.read_header()?;
        }
        Ok(input)
    }

    /// The next physical line without its line ending (`\n` or `\r\n`); `None` at the end.
    fn next_line(&mut self) -> Result<Option<String>, BatchError> {
        let mut buf = Vec::new();
        let n = self
            .lines
            .read_until(b'\n', &mut buf)
            .map_err(|source| BatchError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Ok(None);
        }
        self.line += 1;
        if buf.ends_with(b"\n") {
            buf.pop();
        }
        if buf.ends_with(b"\r") {
            buf.pop();
        }
        Ok(Some(match String::from_utf8(buf) {
            Ok(s) => s,
            // Answered as a bad row by the caller; the replacement char marks where.
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }))
    }

    fn read_header(&mut self) -> Result<(), BatchError> {
        let header = loop {
            match self.next_line()? {
                None => {
                    return Err(BatchError::Empty {
                        path: self.path.clone(),
                    })
                }
                Some(l) if l.trim().is_empty() => continue,
                Some(l) => break l,
            }
        };
        let bad = |reason: String| BatchError::Header {
            path: self.path.clone(),
            reason,
        };
        let header = header.trim_start_matches('\u{feff}');
        let headers: Vec<String> = split_csv_line(header)
            .map_err(bad)?
            .into_iter()
            .map(|h| h.trim().to_owned())
            .collect();
        for (i, h) in headers.iter().enumerate() {
            if headers[..i].contains(h) {
                return Err(bad(format!("column {h:?} appears twice")));
            }
        }
        if !headers.iter().any(|h| h == "KeyPairName") {
            return Err(BatchError::NoNameColumn {
                path: self.path.clone(),
            });
        }
        self.headers = headers;
        Ok(())
    }

    /// Reads row by row, handing each row to `emit`; stops early when `emit` returns false (the
    /// consumer has gone away). Returns the number of rows read.
    pub fn read_rows(
        mut self,
        defaults: &RowDefaults,
        mut emit: impl FnMut(Row) -> bool,
    ) -> Result<u64, BatchError> {
        let mut rows = 0;
        while let Some(text) = self.next_line()? {
            if text.trim().is_empty() {
                continue;
            }
            let line = self.line;
            let bad = |reason: String| {
                BadRow::row(
                    line,
                    defaults.provider,
                    defaults.owner.clone(),
                    format!("line {line}: {reason}"),
                    defaults,
                )
            };
            let row = match self.format {
                Format::Csv => match split_csv_line(&text) {
                    Ok(fields) if fields.len() != self.headers.len() => bad(format!(
                        "{} fields where the header has {}",
                        fields.len(),
                        self.headers.len()
                    )),
                    Ok(fields) => build_row(line, csv_params(&self.headers, &fields), defaults),
                    Err(reason) => bad(reason),
                },
                Format::Jsonl => match jsonl_params(text.trim()) {
                    Ok(params) => build_row(line, params, defaults),
                    Err(reason) => bad(reason),
                },
            };
            rows += 1;
            if !emit(row) {
                break;
            }
        }
        Ok(rows)
    }
}

/// One CSV record on one line, quoted as RFC 4180 says and nothing looser: a field is either
/// bare (no `"` in it) or wholly quoted, with `""` for a quote inside. The csv crate reads on
/// past an unterminated quote (swallowing the rows after it into one field) and keeps a stray
/// quote as text (`"bad"quote"` → `badquote"`); a batch row is one line, and a row whose
/// quoting is wrong fails alone.
pub fn split_csv_line(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err("a quoted field is not closed on its line".into()),
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                }
            }
            match chars.next() {
                None => {
                    fields.push(field);
                    return Ok(fields);
                }
                Some(',') => {}
                Some(_) => return Err("text after the closing quote of a field".into()),
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        fields.push(field);
                        return Ok(fields);
                    }
                    Some(',') => break,
                    Some('"') => {
                        return Err("a quote inside an unquoted field (quote the whole field, and double the quote)".into())
                    }
                    Some(c) => field.push(c),
                }
            }
        }
        fields.push(field);
    }
}

/// A CSV cannot tell an empty cell from an absent parameter, so an empty cell is absent — except
/// `Tag.N.Value` next to a non-empty `Tag.N.Key`, where the API allows an empty value.
fn csv_params(headers: &[String], fields: &[String]) -> BTreeMap<String, String> {
    let mut params = BTreeMap::new();
    for (h, v) in headers.iter().zip(fields) {
        if !v.is_empty() {
            params.insert(h.clone(), v.to_owned());
        }
    }
    for h in headers {
        if let Some(n) = h
            .strip_prefix("Tag.")
            .and_then(|r| r.strip_suffix(".Value"))
        {
            if params.contains_key(&format!("Tag.{n}.Key")) && !params.contains_key(h) {
                params.insert(h.clone(), String::new());
            }
        }
    }
    params
}

fn jsonl_params(text: &str) -> Result<BTreeMap<String, String>, String> {
    /// The object's members in order, duplicates kept (serde_json's map keeps the last).
    struct Members(Vec<(String, serde_json::Value)>);
    impl<'de> serde::Deserialize<'de> for Members {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Members;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("one flat JSON object of API parameters")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Members, A::Error> {
                    let mut out = Vec::new();
                    while let Some(member) = map.next_entry()? {
                        out.push(member);
                    }
                    Ok(Members(out))
                }
            }
            d.deserialize_map(V)
        }
    }
    let Members(members) = serde_json::from_str(text).map_err(|e| {
        if e.is_data() {
            "expected one flat JSON object of API parameters".to_owned()
        } else {
            format!("not valid JSON: {e}")
        }
    })?;
    let mut params = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for (k, v) in members {
        if !seen.insert(k.clone()) {
            return Err(format!("parameter {k} is given twice"));
        }
        match v {
            serde_json::Value::String(s) => {
                params.insert(k, s);
            }
            serde_json::Value::Null => {}
            other => {
                return Err(format!(
                    "parameter {k} must be a string, not {}",
                    json_kind(&other)
                ))
            }
        }
    }
    Ok(params)
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The thread reading a batch file; [`join_reader`] gives its outcome.
pub type Reader = std::thread::JoinHandle<Result<u64, BatchError>>;

/// Reads `input` on its own thread into a bounded channel of `capacity` rows, so reading
/// never runs ahead of the pipeline by more than that. The thread stops early when the receiver
/// is dropped; join it for the read's outcome.
pub fn spawn_reader(
    input: BatchInput,
    defaults: &RowDefaults,
    capacity: usize,
) -> Result<(tokio::sync::mpsc::Receiver<Row>, Reader), BatchError> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Row>(capacity.max(1));
    let defaults = defaults.clone();
    let path = input.path.clone();
    let handle = std::thread::Builder::new()
        .name("keyfleet-batch-reader".into())
        .spawn(move || input.read_rows(&defaults, |row| tx.blocking_send(row).is_ok()))
        .map_err(|source| BatchError::Io { path, source })?;
    Ok((rx, handle))
}

/// Waits for a reader thread and returns what it read (or why it stopped).
pub fn join_reader(path: &Path, handle: Reader) -> Result<u64, BatchError> {
    handle.join().map_err(|_| BatchError::Io {
        path: path.to_owned(),
        source: std::io::Error::other("the batch reader thread panicked"),
    })?
}

/// Counts the rows of a batch cheaply, for the progress bar (a pass over the bytes only).
/// Only a regular file can be read twice: for a pipe or standard input the total is unknown.
pub fn count_rows(path: &Path, format: Option<Format>) -> Option<u64> {
    let format = format.or_else(|| Format::from_path(path))?;
    if !std::fs::metadata(path).ok()?.is_file() {
        return None;
    }
    let file = File::open(path).ok()?;
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let mut lines = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).ok()?;
        if n == 0 {
            break;
        }
        // The same blank-line rule as the reader's (`str::trim`, Unicode whitespace such as
        // U+3000 included), so the total matches the rows it will hand out.
        if !String::from_utf8_lossy(&buf).trim().is_empty() {
            lines += 1;
        }
    }
    Some(match format {
        Format::Csv => lines.saturating_sub(1),
        Format::Jsonl => lines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn defaults() -> RowDefaults {
        RowDefaults {
            batch_id: "b".into(),
            provider: Provider::Aliyun,
            owner: "acct".into(),
            key_bits: KeyBits::B2048,
        }
    }

    fn read(ext: &str, text: &str) -> Vec<Row> {
        let mut f = tempfile::Builder::new().suffix(ext).tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        let mut rows = Vec::new();
        BatchInput::open(f.path(), None)
            .unwrap()
            .read_rows(&defaults(), |r| {
                rows.push(r);
                true
            })
            .unwrap();
        rows
    }

    #[test]
    fn csv_rows_carry_their_line_and_columns() {
        let rows = read(
            ".csv",
            "Provider,Owner,RegionId,Region,KeyPairName,Tag.1.Key,Tag.1.Value\n\
             aliyun,,cn-hangzhou,,web-01,env,\n\
             ucloud,proj,,cn-bj2,db-01,,\n\
             bogus,,cn-hangzhou,,x1,,\n\
             aliyun,too,few\n",
        );
        assert_eq!(rows.len(), 4);
        let Row::Job(j) = &rows[0] else { panic!() };
        assert_eq!(j.line, Some(2));
        assert_eq!(j.owner, "acct");
        assert_eq!(j.params.get("Tag.1.Value").map(String::as_str), Some(""));
        assert!(!j.params.contains_key("Region"));
        let Row::Job(j) = &rows[1] else { panic!() };
        assert_eq!((j.provider, j.owner.as_str()), (Provider::Ucloud, "proj"));
        assert!(!j.params.contains_key("Tag.1.Value"));
        assert!(
            matches!(&rows[2], Row::Bad(BadRow { line: 4, reason, .. }) if reason.contains("Provider"))
        );
        assert!(
            matches!(&rows[3], Row::Bad(BadRow { line: 5, reason, .. }) if reason.contains("fields"))
        );
    }

    #[test]
    fn jsonl_rows_and_bad_lines() {
        let rows = read(
            ".jsonl",
            "{\"RegionId\":\"cn-hangzhou\",\"KeyPairName\":\"a1\"}\n\n{not json\n[1]\n{\"KeyPairName\":5}\n",
        );
        assert_eq!(rows.len(), 4);
        assert!(matches!(&rows[0], Row::Job(j) if j.line == Some(1)));
        assert!(matches!(&rows[1], Row::Bad(BadRow { line: 3, .. })));
        assert!(matches!(&rows[2], Row::Bad(BadRow { line: 4, .. })));
        assert!(
            matches!(&rows[3], Row::Bad(BadRow { line: 5, reason, .. }) if reason.contains("number"))
        );
    }

    #[test]
    fn job_ids_are_stable_per_batch_and_line() {
        assert_eq!(job_id("b", 2), job_id("b", 2));
        assert_ne!(job_id("b", 2), job_id("b", 3));
        assert_ne!(job_id("b", 2), job_id("c", 2));
    }

    #[test]
    fn csv_without_name_column_is_an_error() {
        let mut f = tempfile::Builder::new().suffix(".csv").tempfile().unwrap();
        f.write_all(b"RegionId\ncn-hangzhou\n").unwrap();
        let err = BatchInput::open(f.path(), None).err().unwrap();
        assert!(err.to_string().contains("KeyPairName"));
    }

    #[test]
    fn bad_csv_quoting_fails_its_row_only() {
        let mut text = String::from("Provider,Owner,KeyPairName,Region\n");
        text.push_str("ucloud,,ok-1,cn-bj2\n");
        text.push_str("ucloud,,\"unterminated,cn-bj2\n");
        text.push_str("ucloud,,\"bad\"quote\",cn-bj2\n");
        text.push_str("ucloud,,bare\"quote,cn-bj2\n");
        for i in 0..50 {
            text.push_str(&format!("ucloud,,after-{i},cn-bj2\n"));
        }
        text.push_str("ucloud,,\"a,\"\"b\"\"\",cn-bj2\n");
        let rows = read(".csv", &text);
        assert_eq!(rows.len(), 55);
        assert!(matches!(&rows[0], Row::Job(j) if j.params["KeyPairName"] == "ok-1"));
        for (i, why) in [
            (1, "not closed"),
            (2, "after the closing quote"),
            (3, "unquoted"),
        ] {
            assert!(
                matches!(&rows[i], Row::Bad(BadRow { line, reason, .. }) if *line == i as u64 + 2 && reason.contains(why)),
                "{:?}",
                rows[i]
            );
        }
        assert!(rows[4..54].iter().all(|r| matches!(r, Row::Job(_))));
        assert!(matches!(&rows[54], Row::Job(j) if j.params["KeyPairName"] == "a,\"b\""));
    }

    #[test]
    fn crlf_lines_keep_their_numbers() {
        let rows = read(
            ".csv",
            "RegionId,KeyPairName\r\ncn-hangzhou,a\r\n\r\ncn-hangzhou,b\r\n",
        );
        let lines: Vec<_> = rows
            .iter()
            .map(|r| match r {
                Row::Job(j) => (j.line, j.params["KeyPairName"].clone()),
                Row::Bad(b) => panic!("{b:?}"),
            })
            .collect();
        assert_eq!(lines, [(Some(2), "a".into()), (Some(4), "b".into())]);
    }

    #[test]
    fn duplicate_columns_and_keys_are_refused() {
        let mut f = tempfile::Builder::new().suffix(".csv").tempfile().unwrap();
        f.write_all(b"KeyPairName,RegionId,KeyPairName\na,cn-hangzhou,b\n")
            .unwrap();
        let err = BatchInput::open(f.path(), None).err().unwrap().to_string();
        assert!(err.contains("\"KeyPairName\" appears twice"), "{err}");
        let rows = read(".jsonl", "{\"KeyPairName\":\"a\",\"KeyPairName\":\"b\"}\n");
        assert!(matches!(&rows[0], Row::Bad(BadRow { reason, .. }) if reason.contains("twice")));
    }

    #[test]
    fn empty_csv_says_it_is_empty() {
        let f = tempfile::Builder::new().suffix(".csv").tempfile().unwrap();
        let err = BatchInput::open(f.path(), None).err().unwrap().to_string();
        assert!(err.contains("is empty"), "{err}");
    }
}
