//! Progress of a long batch: a bar on a terminal, plain periodic lines otherwise (CI logs,
//! files), and the counts the end-of-run summary is made from.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::job::JobResult;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, lines otherwise.
    #[default]
    Auto,
    Bar,
    Lines,
    Off,
}

impl ProgressMode {
    /// Whether a total is shown: counting a batch file's rows is a pass over the whole file,
    /// not made when nothing shows it.
    fn shows_total(self) -> bool {
        self != ProgressMode::Off
    }
}

/// Counts by outcome; what the summary reports.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Tally {
    pub rows: u64,
    /// Key pairs made by this run.
    pub created: u64,
    /// Rows whose pair an earlier run of the same batch delivered (listed again, not made).
    pub delivered_earlier: u64,
    pub failed: u64,
    /// Failed rows per error code.
    pub failed_by_code: BTreeMap<String, u64>,
}

impl Tally {
    /// Adds another tally's counts to this one's.
    pub fn merge(&mut self, other: &Tally) {
        self.rows += other.rows;
        self.created += other.created;
        self.delivered_earlier += other.delivered_earlier;
        self.failed += other.failed;
        for (code, n) in &other.failed_by_code {
            *self.failed_by_code.entry(code.clone()).or_default() += n;
        }
    }

    pub fn add(&mut self, r: &JobResult) {
        self.rows += 1;
        if r.created().is_some_and(|c| c.delivered_earlier) {
            self.delivered_earlier += 1;
        } else if r.is_created() {
            self.created += 1;
        } else {
            self.failed += 1;
            *self
                .failed_by_code
                .entry(r.outcome_label().to_owned())
                .or_default() += 1;
        }
    }
}

pub struct Progress {
    bar: Option<ProgressBar>,
    lines: bool,
    started: Instant,
    last_line: Instant,
    every: Duration,
    total: Option<u64>,
    pub tally: Tally,
    /// Rows handed on without an answer yet (`submit`: enqueued jobs).
    pub enqueued: u64,
}

/// A rate as a person reads it: whole numbers from 10/s up, one decimal below.
pub fn rate(per_sec: f64) -> String {
    if per_sec >= 10.0 {
        format!("{per_sec:.0}/s")
    } else {
        format!("{per_sec:.1}/s")
    }
}

impl Progress {
    /// Progress over the rows of the batch file at `path`: they are counted first (a pass over
    /// the file) only when something shows the total.
    pub fn of_batch(
        mode: ProgressMode,
        path: &std::path::Path,
        format: Option<crate::job::batch::Format>,
    ) -> Self {
        let total = mode
            .shows_total()
            .then(|| crate::job::batch::count_rows(path, format))
            .flatten();
        Progress::new(mode, total)
    }

    pub fn new(mode: ProgressMode, total: Option<u64>) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let (bar, lines) = match mode {
            ProgressMode::Off => (false, false),
            ProgressMode::Bar => (true, false),
            ProgressMode::Lines => (false, true),
            ProgressMode::Auto => (terminal, !terminal),
        };
        let bar = bar.then(|| {
            let pb = match total {
                Some(n) => ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr()),
                None => ProgressBar::new_spinner(),
            };
            // indicatif's own `{per_sec}` prints four decimals (`238.1506/s`).
            let style = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} rows  {rate}  eta {eta}  {msg}",
            )
            .map(|s| {
                s.with_key(
                    "rate",
                    |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = w.write_str(&rate(state.per_sec()));
                    },
                )
            })
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            pb.set_style(style);
            pb
        });
        let now = Instant::now();
        Progress {
            bar,
            lines,
            started: now,
            last_line: now,
            every: Duration::from_secs(5),
            total,
            tally: Tally::default(),
            enqueued: 0,
        }
    }

    /// Rows passed on for later (enqueued), not answered here.
    pub fn enqueue(&mut self, rows: u64) {
        self.enqueued += rows;
        self.tick();
    }

    pub fn record(&mut self, r: &JobResult) {
        self.tally.add(r);
        self.tick();
    }

    fn tick(&mut self) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
            bar.set_message(if self.enqueued > 0 {
                format!(
                    "enqueued {}  answered at once {}",
                    self.enqueued, self.tally.rows
                )
            } else {
                format!(
                    "created {}  failed {}",
                    self.tally.created, self.tally.failed
                )
            });
        } else if self.lines && self.last_line.elapsed() >= self.every {
            self.last_line = Instant::now();
            eprintln!("{}", self.line());
        }
    }

    fn line(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let of = self.total.map(|t| format!("/{t}")).unwrap_or_default();
        if self.enqueued > 0 {
            return format!(
                "progress: {}{of} rows, {} enqueued, {} answered at once, {:.0} rows/s",
                self.enqueued + self.tally.rows,
                self.enqueued,
                self.tally.rows,
                (self.enqueued + self.tally.rows) as f64 / secs
            );
        }
        format!(
            "progress: {}{of} rows, {} created, {} failed, {:.1} keys/s",
            self.tally.rows,
            self.tally.created,
            self.tally.failed,
            self.tally.created as f64 / secs
        )
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn finish(self) -> (Tally, Duration) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        (self.tally, self.started.elapsed())
    }
}
