//! Batch files: CSV (RFC 4180) with API parameter names as the header, or JSON Lines with one
//! flat object per line; both UTF-8. Rows are streamed (never the whole file in memory); a row
//! that cannot be read becomes a failed entry naming its line, and the rest goes on.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use crate::dialect::Provider;
use crate::job::{job_id, Job, MESSAGE_VERSION};
use crate::keys::keygen::KeyBits;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// One row of a batch lent by [`BatchInput::lend_rows`]: a job (the reader's, written over by
/// the next row), or why the row is not one.
#[derive(Debug)]
pub enum RowRef<'a> {
    Job(&'a Job),
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

/// Columns that are keyfleet's own, not API parameters.
const PROVIDER_COL: &str = "Provider";
const OWNER_COL: &str = "Owner";

/// A row's job finished from its parameters, already in `job.params`: its line, its id, and
/// (`own_columns`: `params` may hold keyfleet's own columns) its owner and provider. A CSV
/// whose header has neither column is not searched for them, row after row, and its rows
/// keep the defaults' owner and provider.
fn finish_row(
    job: &mut Job,
    line: u64,
    own_columns: bool,
    defaults: &RowDefaults,
) -> Result<(), BadRow> {
    job.line = Some(line);
    job.job_id = job_id(&defaults.batch_id, line);
    if !own_columns {
        return Ok(());
    }
    let owner = job.params.remove(OWNER_COL);
    job.owner.clear();
    job.owner.push_str(match owner.as_deref().map(str::trim) {
        Some(o) if !o.is_empty() => o,
        _ => &defaults.owner,
    });
    job.provider = defaults.provider;
    match job.params.remove(PROVIDER_COL) {
        Some(p) if !p.trim().is_empty() => match p.parse::<Provider>() {
            Ok(p) => job.provider = p,
            Err(e) => {
                return Err(BadRow {
                    batch_id: defaults.batch_id.clone(),
                    line,
                    provider: defaults.provider,
                    owner: job.owner.clone(),
                    reason: format!("line {line}: column Provider: {e}"),
                })
            }
        },
        _ => {}
    }
    Ok(())
}

/// The path that means standard input.
pub const STDIN: &str = "-";

/// Most physical lines one CSV record may span (a quoted field may hold line breaks, as RFC 4180
/// allows). A quote still open past this — or at the end of the input — counts as not closed:
/// its record's first line fails alone and reading resumes on the line after it, so a stray
/// quote costs one row, not the rest of the file (and the lines read ahead stay bounded).
const MAX_RECORD_LINES: usize = 64;
/// Most bytes the lines after a record's first may add to it; past this, as above.
const MAX_RECORD_BYTES: usize = 256 * 1024;

/// A batch opened once — a file, a FIFO, or standard input (`-`) — with its CSV header already
/// read and checked, so a bad input fails before anything is created.
pub struct BatchInput {
    path: PathBuf,
    format: Format,
    lines: Box<dyn BufRead + Send>,
    /// Physical lines consumed from `lines` so far (the header's included).
    line: u64,
    /// Lines read ahead for a record that turned out broken, to be read again (numbered).
    pending: VecDeque<(u64, Vec<u8>)>,
    /// A line's buffer, done with, for the next line to be read into (one allocation a file,
    /// not one a row).
    spare: Vec<u8>,
    headers: Vec<String>,
    /// Whether the CSV header has a column of keyfleet's own (`Owner`, `Provider`).
    own_columns: bool,
}

/// One CSV record or JSONL line, not yet a job.
enum RawRow {
    /// A CSV record of one line with no quote in it: its fields are read in place.
    Plain(Vec<u8>),
    Csv(Result<Vec<Vec<u8>>, String>),
    Jsonl(Vec<u8>),
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
            pending: VecDeque::new(),
            spare: Vec::new(),
            headers: Vec::new(),
            own_columns: false,
        };
        if format == Format::Csv {
            input.read_header()?;
        }
        Ok(input)
    }

    /// The next physical line, numbered, as bytes with its line ending (`\n`, `\r\n`, or none at
    /// the end of the input); `None` at the end. A UTF-8 byte order mark opening the input is
    /// dropped.
    fn next_line(&mut self) -> Result<Option<(u64, Vec<u8>)>, BatchError> {
        if let Some(line) = self.pending.pop_front() {
            return Ok(Some(line));
        }
        let mut buf = std::mem::take(&mut self.spare);
        buf.clear();
        // Sized for a typical row, so a first read is one allocation, not a run of regrowths.
        buf.reserve(128);
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
        if self.line == 1 && buf.starts_with(b"\xEF\xBB\xBF") {
            buf.drain(..3);
        }
        Ok(Some((self.line, buf)))
    }

    /// The next line that is not blank; `None` at the end.
    fn next_filled_line(&mut self) -> Result<Option<(u64, Vec<u8>)>, BatchError> {
        loop {
            match self.next_line()? {
                Some((_, l)) if is_blank(&l) => continue,
                other => return Ok(other),
            }
        }
    }

    /// The next row, with the line it starts on; `None` at the end.
    fn next_raw(&mut self) -> Result<Option<(u64, RawRow)>, BatchError> {
        let Some((start, first)) = self.next_filled_line()? else {
            return Ok(None);
        };
        Ok(Some(match self.format {
            Format::Jsonl => (start, RawRow::Jsonl(first)),
            Format::Csv if !first.contains(&b'"') => (start, RawRow::Plain(first)),
            Format::Csv => (start, RawRow::Csv(self.csv_record(first)?)),
        }))
    }

    /// The CSV record starting with line `first`, read on over the lines a quoted field runs
    /// into. When such a record breaks, only its first line fails: the lines after it are
    /// read again as rows of their own.
    fn csv_record(&mut self, first: Vec<u8>) -> Result<Result<Vec<Vec<u8>>, String>, BatchError> {
        // Room for a row's fields (none known yet while the header is read).
        let mut record = CsvRecord {
            fields: Vec::with_capacity(self.headers.len()),
            ..CsvRecord::default()
        };
        let mut more: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut bytes = 0;
        let why = match record.feed(&first) {
            Ok(true) => {
                self.spare = first;
                return Ok(Ok(record.fields));
            }
            Err(reason) => return Ok(Err(reason)),
            Ok(false) if !first.ends_with(b"\n") => None,
            Ok(false) => loop {
                if more.len() + 1 >= MAX_RECORD_LINES || bytes > MAX_RECORD_BYTES {
                    break Some(format!(
                        "it runs on past {MAX_RECORD_LINES} lines or {} KiB",
                        MAX_RECORD_BYTES / 1024
                    ));
                }
                let Some((n, line)) = self.next_line()? else {
                    break None;
                };
                bytes += line.len();
                let fed = record.feed(&line);
                let ended = line.ends_with(b"\n");
                more.push((n, line));
                match fed {
                    Ok(true) => return Ok(Ok(record.fields)),
                    Ok(false) if ended => continue,
                    Ok(false) => break None,
                    Err(reason) => {
                        break Some(format!(
                            "read on over its line breaks, line {n} has {reason}"
                        ))
                    }
                }
            },
        };
        for line in more.into_iter().rev() {
            self.pending.push_front(line);
        }
        Ok(Err(match why {
            None => "a quoted field is not closed by the end of the input".into(),
            Some(why) => format!("a quoted field is not closed ({why})"),
        }))
    }

    fn read_header(&mut self) -> Result<(), BatchError> {
        let bad = |path: &Path, reason: String| BatchError::Header {
            path: path.to_owned(),
            reason,
        };
        let Some((_, first)) = self.next_filled_line()? else {
            return Err(BatchError::Empty {
                path: self.path.clone(),
            });
        };
        let fields = self
            .csv_record(first)?
            .map_err(|reason| bad(&self.path, reason))?;
        let mut headers = Vec::with_capacity(fields.len());
        for (i, field) in fields.into_iter().enumerate() {
            match String::from_utf8(field) {
                Ok(h) => headers.push(h.trim().to_owned()),
                Err(e) => {
                    return Err(bad(
                        &self.path,
                        not_utf8(i + 1, None, e.as_bytes(), e.utf8_error()),
                    ))
                }
            }
        }
        for (i, h) in headers.iter().enumerate() {
            if headers[..i].contains(h) {
                return Err(bad(&self.path, format!("column {h:?} appears twice")));
            }
        }
        if !headers.iter().any(|h| h == "KeyPairName") {
            return Err(BatchError::NoNameColumn {
                path: self.path.clone(),
            });
        }
        self.own_columns = headers.iter().any(|h| h == OWNER_COL || h == PROVIDER_COL);
        self.headers = headers;
        Ok(())
    }

    /// Runs `read` with this input on the batch reader's thread; join it for the outcome.
    pub fn read_on_thread(
        self,
        read: impl FnOnce(BatchInput) -> Result<u64, BatchError> + Send + 'static,
    ) -> Result<Reader, BatchError> {
        let path = self.path.clone();
        std::thread::Builder::new()
            .name("keyfleet-batch-reader".into())
            .spawn(move || read(self))
            .map_err(|source| BatchError::Io { path, source })
    }

    /// Reads row by row, handing each row to `emit`; stops early when `emit` returns false (the
    /// consumer has gone away). Returns the number of rows read.
    pub fn read_rows(
        self,
        defaults: &RowDefaults,
        mut emit: impl FnMut(Row) -> bool,
    ) -> Result<u64, BatchError> {
        self.lend_rows(defaults, |row| {
            emit(match row {
                RowRef::Job(job) => Row::Job(job.clone()),
                RowRef::Bad(bad) => Row::Bad(bad),
            })
        })
    }

    /// [`BatchInput::read_rows`], each job lent to `emit` rather than given: the reader keeps
    /// one job and writes each row over it (its parameters' strings in place), so a row
    /// whose columns were filled in the row before costs no allocation. `submit`'s packer
    /// checks and encodes a job and is done with it; reading in place took 23 % off its
    /// thread's instructions (docs/benchmarks.md, 2026-12-07 (Zen 4, noon)).
    pub fn lend_rows(
        mut self,
        defaults: &RowDefaults,
        mut emit: impl FnMut(RowRef<'_>) -> bool,
    ) -> Result<u64, BatchError> {
        let mut job = Job {
            v: MESSAGE_VERSION,
            job_id: uuid::Uuid::nil(),
            batch_id: defaults.batch_id.clone(),
            line: None,
            provider: defaults.provider,
            owner: defaults.owner.clone(),
            params: BTreeMap::new(),
            key_bits: defaults.key_bits,
        };
        let mut rows = 0;
        while let Some((line, raw)) = self.next_raw()? {
            let filled = match raw {
                RawRow::Plain(bytes) => {
                    let filled = fill_plain(&self.headers, &bytes, &mut job.params);
                    self.spare = bytes;
                    filled.map(|()| self.own_columns)
                }
                RawRow::Csv(Ok(fields)) if fields.len() != self.headers.len() => {
                    Err(field_count(fields.len(), self.headers.len()))
                }
                RawRow::Csv(Ok(fields)) => csv_text(&self.headers, fields).map(|fields| {
                    fill_csv(
                        &mut job.params,
                        &self.headers,
                        fields.iter().map(String::as_str),
                    );
                    self.own_columns
                }),
                RawRow::Csv(Err(reason)) => Err(reason),
                RawRow::Jsonl(bytes) => {
                    let text = strip_eol(&bytes);
                    let filled = match std::str::from_utf8(text) {
                        Ok(text) => jsonl_params(text.trim()).map(|params| {
                            job.params = params;
                            true
                        }),
                        Err(e) => Err(not_utf8_in_line(text, e)),
                    };
                    self.spare = bytes;
                    filled
                }
            };
            let row = filled
                .map_err(|reason| BadRow {
                    batch_id: defaults.batch_id.clone(),
                    line,
                    provider: defaults.provider,
                    owner: defaults.owner.clone(),
                    reason: format!("line {line}: {reason}"),
                })
                .and_then(|own_columns| finish_row(&mut job, line, own_columns, defaults));
            rows += 1;
            let go = match row {
                Ok(()) => emit(RowRef::Job(&job)),
                Err(bad) => emit(RowRef::Bad(bad)),
            };
            if !go {
                break;
            }
        }
        Ok(rows)
    }
}

/// Why a CSV record is not a row: its field count is not the header's.
fn field_count(fields: usize, headers: usize) -> String {
    format!("{fields} fields where the header has {headers}")
}

/// A CSV record with no quote in it, as most are: its fields are the pieces of `line` between
/// commas, read where they lie (RFC 4180 gives such a record no other reading) into `params`.
fn fill_plain(
    headers: &[String],
    line: &[u8],
    params: &mut BTreeMap<String, String>,
) -> Result<(), String> {
    let bytes = strip_eol(line);
    let fields = bytes.iter().filter(|&&b| b == b',').count() + 1;
    if fields != headers.len() {
        return Err(field_count(fields, headers.len()));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| {
        // The first field that is not UTF-8 names the error, as a quoted record's would.
        bytes
            .split(|&b| b == b',')
            .enumerate()
            .find_map(|(i, f)| {
                std::str::from_utf8(f)
                    .err()
                    .map(|e| not_utf8(i + 1, headers.get(i).map(String::as_str), f, e))
            })
            .unwrap_or_default()
    })?;
    fill_csv(params, headers, text.split(','));
    Ok(())
}

/// `line` without its line ending (`\n` or `\r\n`).
fn strip_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// A line of whitespace only (`str::trim`'s, Unicode whitespace such as U+3000 included) is
/// skipped, not a row. A line that is not UTF-8 is not blank: it is a row, and fails.
fn is_blank(line: &[u8]) -> bool {
    match line.first() {
        // The common case, decided without reading the line: it starts with an ASCII
        // character that is not whitespace as `trim` counts it (U+000B included).
        Some(&b) if b.is_ascii() && !char::from(b).is_whitespace() => false,
        _ => std::str::from_utf8(line).is_ok_and(|s| s.trim().is_empty()),
    }
}

/// Why a JSON Lines row is not UTF-8: where, by character column, as an editor counts.
fn not_utf8_in_line(text: &[u8], e: std::str::Utf8Error) -> String {
    let at = e.valid_up_to();
    let column = String::from_utf8_lossy(&text[..at]).chars().count() + 1;
    format!(
        "column {column}: byte 0x{:02X} is not valid UTF-8 (a batch file must be UTF-8)",
        text[at]
    )
}

/// Why CSV field `column` (1-based; `header` its name, for a row) is not UTF-8.
fn not_utf8(column: usize, header: Option<&str>, bytes: &[u8], e: std::str::Utf8Error) -> String {
    let at = e.valid_up_to();
    let character = String::from_utf8_lossy(&bytes[..at]).chars().count() + 1;
    let name = header.map(|h| format!(" ({h})")).unwrap_or_default();
    format!(
        "column {column}{name}: byte 0x{:02X} at character {character} of the field is not \
         valid UTF-8 (a batch file must be UTF-8)",
        bytes[at]
    )
}

/// A record's fields as text; the first that is not UTF-8 fails the row. Nothing is replaced
/// (a pair never carries a U+FFFD its file did not hold).
fn csv_text(headers: &[String], fields: Vec<Vec<u8>>) -> Result<Vec<String>, String> {
    fields
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            String::from_utf8(f).map_err(|e| {
                not_utf8(
                    i + 1,
                    headers.get(i).map(String::as_str),
                    e.as_bytes(),
                    e.utf8_error(),
                )
            })
        })
        .collect()
}

/// One CSV record as RFC 4180 quotes it, and nothing looser: a field is either bare (no `"` in
/// it) or wholly quoted, with `""` for a quote inside; only a quoted field holds line breaks
/// (kept as the file has them, `\r\n` or `\n`). Fed a physical line at a time. The csv crate
/// is looser: it keeps a stray quote as text (`"bad"quote"` → `badquote"`) and reads on past
/// an unterminated quote to the end of the file; here such a row fails alone.
#[derive(Default)]
struct CsvRecord {
    fields: Vec<Vec<u8>>,
    field: Vec<u8>,
    at: At,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum At {
    /// The start of a field.
    #[default]
    Start,
    Bare,
    Quoted,
    /// A `"` inside a quoted field: its end, or the first of `""`.
    QuoteInQuoted,
}

impl CsvRecord {
    /// Takes one physical line (with its line ending); `Ok(true)` when the record ends with it,
    /// `Ok(false)` when a quoted field runs on into the next line.
    fn feed(&mut self, line: &[u8]) -> Result<bool, String> {
        let text = strip_eol(line);
        if self.at == At::Start && self.fields.is_empty() && !text.contains(&b'"') {
            // No quotes: the fields are the pieces between commas, each copied once.
            self.fields
                .extend(text.split(|&b| b == b',').map(<[u8]>::to_vec));
            return Ok(true);
        }
        self.feed_bytes(line)
    }

    /// [`CsvRecord::feed`] a byte at a time, quotes and all.
    fn feed_bytes(&mut self, line: &[u8]) -> Result<bool, String> {
        let text = strip_eol(line);
        for &b in text {
            self.at = match (self.at, b) {
                (At::Start, b'"') => At::Quoted,
                (At::Start | At::Bare | At::QuoteInQuoted, b',') => {
                    self.fields.push(std::mem::take(&mut self.field));
                    At::Start
                }
                (At::Bare, b'"') => {
                    return Err(
                        "a quote inside an unquoted field (quote the whole field, and \
                                double the quote)"
                            .into(),
                    )
                }
                (At::Start | At::Bare, b) => {
                    self.field.push(b);
                    At::Bare
                }
                (At::Quoted, b'"') => At::QuoteInQuoted,
                (At::Quoted, b) => {
                    self.field.push(b);
                    At::Quoted
                }
                (At::QuoteInQuoted, b'"') => {
                    self.field.push(b'"');
                    At::Quoted
                }
                (At::QuoteInQuoted, _) => {
                    return Err("text after the closing quote of a field".into())
                }
            };
        }
        if self.at == At::Quoted {
            self.field.extend_from_slice(&line[text.len()..]);
            return Ok(false);
        }
        self.fields.push(std::mem::take(&mut self.field));
        Ok(true)
    }
}

/// A CSV record's fields written over the last row's parameters, in place (a parameter the
/// last row had keeps its strings' room). A CSV cannot tell an empty cell from an absent
/// parameter, so an empty cell is absent — except `Tag.N.Value` next to a non-empty
/// `Tag.N.Key`, where the API allows an empty value. Every column is written, so nothing of
/// the last row is left.
fn fill_csv<'a>(
    params: &mut BTreeMap<String, String>,
    headers: &[String],
    fields: impl Iterator<Item = &'a str>,
) {
    for (h, v) in headers.iter().zip(fields) {
        if v.is_empty() {
            params.remove(h);
        } else if let Some(slot) = params.get_mut(h) {
            slot.clear();
            slot.push_str(v);
        } else {
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
    let handle = input.read_on_thread(move |input| {
        input.read_rows(&defaults, |row| tx.blocking_send(row).is_ok())
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

/// Counts the rows of a batch for the progress bar: a pass that splits records as the reader
/// does (quoted line breaks, blank lines), without making jobs. Only a regular file can be read
/// twice: for a pipe or standard input the total is unknown.
pub fn count_rows(path: &Path, format: Option<Format>) -> Option<u64> {
    if !std::fs::metadata(path).ok()?.is_file() {
        return None;
    }
    let mut input = BatchInput::open(path, format).ok()?;
    let mut rows = 0u64;
    while let Some((_, raw)) = input.next_raw().ok()? {
        if let RawRow::Plain(line) | RawRow::Jsonl(line) = raw {
            input.spare = line;
        }
        rows += 1;
    }
    Some(rows)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// A batch's defaults for the tests (also `packer`'s).
    pub(crate) fn defaults() -> RowDefaults {
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
        rows_in(f.path())
    }

    /// Every row of the batch file at `path`.
    fn rows_in(path: &std::path::Path) -> Vec<Row> {
        let mut rows = Vec::new();
        BatchInput::open(path, None)
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
    fn read_bytes(ext: &str, bytes: &[u8]) -> Vec<Row> {
        let mut f = tempfile::Builder::new().suffix(ext).tempfile().unwrap();
        f.write_all(bytes).unwrap();
        let rows = rows_in(f.path());
        assert_eq!(count_rows(f.path(), None), Some(rows.len() as u64));
        rows
    }

    #[test]
    fn quoted_line_breaks_are_one_record_and_later_lines_keep_their_numbers() {
        let rows = read(
            ".csv",
            "KeyPairName,Description\r\n\
             a1,\"two\r\nlines\"\r\n\
             a2,\"three\nlines, \"\"quoted\"\"\n\nand a blank one\"\n\
             a3,plain\n",
        );
        let got: Vec<_> = rows
            .iter()
            .map(|r| match r {
                Row::Job(j) => (
                    j.line,
                    j.params["KeyPairName"].clone(),
                    j.params["Description"].clone(),
                ),
                Row::Bad(b) => panic!("{b:?}"),
            })
            .collect();
        assert_eq!(
            got,
            [
                (Some(2), "a1".into(), "two\r\nlines".into()),
                (
                    Some(4),
                    "a2".into(),
                    "three\nlines, \"quoted\"\n\nand a blank one".into()
                ),
                (Some(8), "a3".into(), "plain".into()),
            ]
        );
    }

    #[test]
    fn a_quote_left_open_fails_its_line_only_even_far_from_the_end() {
        let mut text = String::from("KeyPairName,Description\nok-1,x\nbad,\"open\n");
        for i in 0..(MAX_RECORD_LINES + 10) {
            text.push_str(&format!("after-{i},y\n"));
        }
        let rows = read(".csv", &text);
        assert_eq!(rows.len(), MAX_RECORD_LINES + 12);
        assert!(
            matches!(&rows[1], Row::Bad(BadRow { line: 3, reason, .. }) if reason.contains("not closed")),
            "{:?}",
            rows[1]
        );
        for (i, row) in rows[2..].iter().enumerate() {
            assert!(
                matches!(row, Row::Job(j) if j.line == Some(i as u64 + 4) && j.params["KeyPairName"] == format!("after-{i}")),
                "{row:?}"
            );
        }
    }

    #[test]
    fn invalid_utf8_fails_its_row_naming_line_and_column() {
        let rows = read_bytes(
            ".csv",
            b"KeyPairName,Tag.1.Key,Tag.1.Value\na1,env,pr\xffod\na2,env,prod\n",
        );
        assert!(
            matches!(&rows[0], Row::Bad(BadRow { line: 2, reason, .. })
                if reason.contains("line 2") && reason.contains("column 3 (Tag.1.Value)")
                    && reason.contains("0xFF") && !reason.contains('\u{fffd}')),
            "{:?}",
            rows[0]
        );
        assert!(matches!(&rows[1], Row::Job(j) if j.params["Tag.1.Value"] == "prod"));
        let rows = read_bytes(
            ".jsonl",
            b"{\"KeyPairName\":\"a1\",\"Tag.1.Key\":\"pr\xffod\"}\n{\"KeyPairName\":\"a2\"}\n",
        );
        assert!(
            matches!(&rows[0], Row::Bad(BadRow { line: 1, reason, .. })
                if reason.contains("line 1: column 36") && reason.contains("0xFF")),
            "{:?}",
            rows[0]
        );
        assert!(matches!(&rows[1], Row::Job(j) if j.line == Some(2)));
        let mut f = tempfile::Builder::new().suffix(".csv").tempfile().unwrap();
        f.write_all(b"KeyPairName,Re\xe9gion\n").unwrap();
        let err = BatchInput::open(f.path(), None).err().unwrap().to_string();
        assert!(err.contains("column 2") && err.contains("UTF-8"), "{err}");
    }

    #[test]
    fn a_byte_order_mark_is_dropped() {
        let rows = read_bytes(".csv", b"\xEF\xBB\xBFKeyPairName\na1\n");
        assert!(matches!(&rows[0], Row::Job(j) if j.params["KeyPairName"] == "a1"));
        let rows = read_bytes(".jsonl", b"\xEF\xBB\xBF{\"KeyPairName\":\"a1\"}\n");
        assert!(matches!(&rows[0], Row::Job(j) if j.params["KeyPairName"] == "a1"));
    }
    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
        /// Any mix of quotes, commas, line breaks and bad bytes: every row names a later line
        /// than the one before, no line is read twice into two rows' starts, and the progress
        /// total is the rows the reader hands out.
        #[test]
        fn csv_records_keep_order_and_count(body in proptest::collection::vec(
            proptest::sample::select(vec![b'a', b',', b'"', b'\n', b'\r', b' ', 0xFF]), 0..400)
        ) {
            let mut text = b"KeyPairName,Description\n".to_vec();
            text.extend_from_slice(&body);
            let mut f = tempfile::Builder::new().suffix(".csv").tempfile().unwrap();
            f.write_all(&text).unwrap();
            let mut lines = Vec::new();
            BatchInput::open(f.path(), None)
                .unwrap()
                .read_rows(&defaults(), |r| {
                    lines.push(match r {
                        Row::Job(j) => j.line.unwrap(),
                        Row::Bad(b) => b.line,
                    });
                    true
                })
                .unwrap();
            proptest::prop_assert!(lines.windows(2).all(|w| w[0] < w[1]), "{lines:?}");
            proptest::prop_assert_eq!(count_rows(f.path(), None), Some(lines.len() as u64));
        }

        /// A line without quotes is split on its commas at once; byte by byte gives the same
        /// fields.
        #[test]
        fn a_line_without_quotes_splits_as_byte_by_byte(line in proptest::collection::vec(
            proptest::sample::select(vec![b'a', b',', b' ', b'\r', 0xFF]), 0..60),
            eol in proptest::sample::select(vec!["", "\n", "\r\n"])
        ) {
            let mut line = line;
            line.extend_from_slice(eol.as_bytes());
            let (mut fast, mut slow) = (CsvRecord::default(), CsvRecord::default());
            proptest::prop_assert_eq!(fast.feed(&line), slow.feed_bytes(&line));
            proptest::prop_assert_eq!(fast.fields, slow.fields);
        }

        /// A record without quotes read in place gives what the byte-by-byte reader and a
        /// fresh map give: the same parameters, or the same reason it is not a row.
        #[test]
        fn a_plain_record_is_read_in_place_as_byte_by_byte(line in proptest::collection::vec(
            proptest::sample::select(vec![b'a', b'b', b',', b',', b' ', 0xC3, 0xA9, 0xFF]), 0..12),
            eol in proptest::sample::select(vec!["", "\n", "\r\n"]),
            stale in proptest::sample::select(vec!["", "x", "old"]),
        ) {
            let headers: Vec<String> =
                ["KeyPairName", "Tag.1.Key", "Tag.1.Value"].map(String::from).to_vec();
            let mut line = line;
            line.extend_from_slice(eol.as_bytes());
            let mut slow = CsvRecord::default();
            proptest::prop_assert_eq!(slow.feed_bytes(&line), Ok(true));
            let want = if slow.fields.len() != headers.len() {
                Err(field_count(slow.fields.len(), headers.len()))
            } else {
                csv_text(&headers, slow.fields).map(|fields| {
                    let mut params = BTreeMap::new();
                    fill_csv(&mut params, &headers, fields.iter().map(String::as_str));
                    params
                })
            };
            // The map holds a row before this one, as the reader's does.
            let mut params: BTreeMap<String, String> = headers
                .iter()
                .filter(|_| !stale.is_empty())
                .map(|h| (h.clone(), stale.to_owned()))
                .collect();
            let got = fill_plain(&headers, &line, &mut params).map(|()| params);
            proptest::prop_assert_eq!(got, want);
        }

        /// Each row's job, read over the last row's in place, is the job that row makes when
        /// it is a file's only row: nothing of the rows before it is left in it.
        #[test]
        fn a_row_read_in_place_keeps_nothing_of_the_row_before(
            own in proptest::bool::ANY,
            quoted in proptest::bool::ANY,
            rows in proptest::collection::vec(proptest::collection::vec(
                proptest::sample::select(vec!["", "", "web-1", "x,y", "ucloud", " o ", "bogus"]), 6), 1..8),
        ) {
            let mut headers = vec!["RegionId", "KeyPairName", "Tag.1.Key", "Tag.1.Value"];
            if own {
                headers.extend(["Owner", "Provider"]);
            }
            let header = headers.join(",");
            let cell = |c: &str| if quoted || c.contains(',') { format!("\"{c}\"") } else { c.to_owned() };
            let lines: Vec<String> = rows
                .iter()
                .map(|r| r[..headers.len()].iter().map(|c| cell(c)).collect::<Vec<_>>().join(","))
                .collect();
            let whole = read(".csv", &format!("{header}\n{}\n", lines.join("\n")));
            proptest::prop_assert_eq!(whole.len(), lines.len());
            for (i, (row, line)) in whole.iter().zip(&lines).enumerate() {
                let alone = read(".csv", &format!("{header}\n{line}\n"));
                let at = i as u64 + 2;
                match (row, &alone[0]) {
                    (Row::Job(a), Row::Job(b)) => {
                        proptest::prop_assert_eq!(a.line, Some(at));
                        proptest::prop_assert_eq!(a.job_id, job_id(&a.batch_id, at));
                        let a = Job { line: b.line, job_id: b.job_id, ..a.clone() };
                        proptest::prop_assert_eq!(&a, b);
                    }
                    (Row::Bad(a), Row::Bad(b)) => {
                        proptest::prop_assert_eq!(a.line, at);
                        proptest::prop_assert_eq!(
                            a.reason.replace(&format!("line {at}"), "line 2"),
                            b.reason.clone()
                        );
                        proptest::prop_assert_eq!((&a.owner, a.provider), (&b.owner, b.provider));
                    }
                    (a, b) => proptest::prop_assert!(false, "{a:?} alone is {b:?}"),
                }
            }
        }

        /// Deciding a line is not blank by its first byte agrees with reading it all.
        #[test]
        fn a_blank_line_is_told_by_its_first_byte_as_by_trimming_it(line in proptest::collection::vec(
            proptest::sample::select(vec![b'a', b' ', b'\t', 0x0B, 0x0C, b'\r', b'\n', 0x1C, 0x85, 0xC2, 0xA0, 0xE3, 0x80, 0xFF]), 0..8)
        ) {
            let trimmed = std::str::from_utf8(&line).is_ok_and(|s| s.trim().is_empty());
            proptest::prop_assert_eq!(is_blank(&line), trimmed);
        }
    }
}
