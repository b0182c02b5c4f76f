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
    #[error("cannot read batch file {path}: {source}")]
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

/// Reads `path` row by row, handing each row to `emit`; stops early when `emit` returns false
/// (the consumer has gone away). Returns the number of rows read.
pub fn read_rows(
    path: &Path,
    format: Option<Format>,
    defaults: &RowDefaults,
    mut emit: impl FnMut(Row) -> bool,
) -> Result<u64, BatchError> {
    let format = format
        .or_else(|| Format::from_path(path))
        .ok_or_else(|| BatchError::UnknownFormat(path.to_owned()))?;
    let file = File::open(path).map_err(|source| BatchError::Io {
        path: path.to_owned(),
        source,
    })?;
    match format {
        Format::Csv => read_csv(path, file, defaults, &mut emit),
        Format::Jsonl => read_jsonl(path, file, defaults, &mut emit),
    }
}

fn read_csv(
    path: &Path,
    file: File,
    defaults: &RowDefaults,
    emit: &mut impl FnMut(Row) -> bool,
) -> Result<u64, BatchError> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::Headers)
        .from_reader(BufReader::new(file));
    let headers = reader
        .headers()
        .map_err(|e| BatchError::Header {
            path: path.to_owned(),
            reason: e.to_string(),
        })?
        .clone();
    let headers: Vec<String> = headers
        .iter()
        .map(|h| h.trim_start_matches('\u{feff}').to_owned())
        .collect();
    if !headers.iter().any(|h| h == "KeyPairName") {
        return Err(BatchError::NoNameColumn {
            path: path.to_owned(),
        });
    }
    let mut rows = 0;
    let mut record = csv::StringRecord::new();
    loop {
        let line = reader.position().line() + 1;
        let row = match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                let line = record.position().map(|p| p.line()).unwrap_or(line);
                if record.len() != headers.len() {
                    BadRow::row(
                        line,
                        defaults.provider,
                        defaults.owner.clone(),
                        format!(
                            "line {line}: {} fields where the header has {}",
                            record.len(),
                            headers.len()
                        ),
                        defaults,
                    )
                } else {
                    build_row(line, csv_params(&headers, &record), defaults)
                }
            }
            Err(e) => {
                if matches!(e.kind(), csv::ErrorKind::Io(_)) {
                    return Err(BatchError::Io {
                        path: path.to_owned(),
                        source: std::io::Error::other(e.to_string()),
                    });
                }
                let line = e.position().map(|p| p.line()).unwrap_or(line);
                BadRow::row(
                    line,
                    defaults.provider,
                    defaults.owner.clone(),
                    format!("line {line}: {e}"),
                    defaults,
                )
            }
        };
        rows += 1;
        if !emit(row) {
            break;
        }
    }
    Ok(rows)
}

/// A CSV cannot tell an empty cell from an absent parameter, so an empty cell is absent — except
/// `Tag.N.Value` next to a non-empty `Tag.N.Key`, where the API allows an empty value.
fn csv_params(headers: &[String], record: &csv::StringRecord) -> BTreeMap<String, String> {
    let mut params = BTreeMap::new();
    for (h, v) in headers.iter().zip(record.iter()) {
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

fn read_jsonl(
    path: &Path,
    file: File,
    defaults: &RowDefaults,
    emit: &mut impl FnMut(Row) -> bool,
) -> Result<u64, BatchError> {
    let mut reader = BufReader::new(file);
    let mut buf = String::new();
    let mut line = 0u64;
    let mut rows = 0;
    loop {
        buf.clear();
        let n = reader
            .read_line(&mut buf)
            .map_err(|source| BatchError::Io {
                path: path.to_owned(),
                source,
            })?;
        if n == 0 {
            break;
        }
        line += 1;
        let text = buf.trim();
        if text.is_empty() {
            continue;
        }
        let row = match jsonl_params(text) {
            Ok(params) => build_row(line, params, defaults),
            Err(reason) => BadRow::row(
                line,
                defaults.provider,
                defaults.owner.clone(),
                format!("line {line}: {reason}"),
                defaults,
            ),
        };
        rows += 1;
        if !emit(row) {
            break;
        }
    }
    Ok(rows)
}

fn jsonl_params(text: &str) -> Result<BTreeMap<String, String>, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let obj = value
        .as_object()
        .ok_or("expected one flat JSON object of API parameters")?;
    let mut params = BTreeMap::new();
    for (k, v) in obj {
        match v {
            serde_json::Value::String(s) => {
                params.insert(k.clone(), s.clone());
            }
            serde_json::Value::Null => {}
            other => {
                return Err(format!(
                    "parameter {k} must be a string, not {}",
                    json_kind(other)
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

/// Reads `path` on its own thread into a bounded channel of `capacity` rows, so reading never
/// runs ahead of the pipeline by more than that. The thread stops early when the receiver is
/// dropped; join it for the read's outcome.
pub fn spawn_reader(
    path: &Path,
    format: Option<Format>,
    defaults: &RowDefaults,
    capacity: usize,
) -> Result<(tokio::sync::mpsc::Receiver<Row>, Reader), BatchError> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Row>(capacity.max(1));
    let (input, defaults) = (path.to_owned(), defaults.clone());
    let handle = std::thread::Builder::new()
        .name("keyfleet-batch-reader".into())
        .spawn(move || {
            read_rows(&input, format, &defaults, |row| {
                tx.blocking_send(row).is_ok()
            })
        })
        .map_err(|source| BatchError::Io {
            path: path.to_owned(),
            source,
        })?;
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
pub fn count_rows(path: &Path, format: Option<Format>) -> Option<u64> {
    let format = format.or_else(|| Format::from_path(path))?;
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
        if buf.iter().any(|b| !b.is_ascii_whitespace()) {
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
        read_rows(f.path(), None, &defaults(), |r| {
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
        let err = read_rows(f.path(), None, &defaults(), |_| true).unwrap_err();
        assert!(err.to_string().contains("KeyPairName"));
    }
}
